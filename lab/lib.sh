# Shell helpers for lab jobs (sourced from /opt/remus/lab/lib.sh in dom0).
export PYTHONPATH=/opt/remus PYTHONDONTWRITEBYTECODE=1 REMUS_STATE_DIR=/tmp/remus
mkdir -p /tmp/remus
remusctl() { python3 -m orchestrator.cli "$@"; }
now() { cut -d' ' -f1 /proc/uptime; }
# the guest's key-value service; empty output when it does not answer
kv() { wget -q -T "${KV_TIMEOUT:-2}" -O - "http://10.0.0.2/cgi-bin/kv?$1" 2>/dev/null; }
wait_guest() {  # wait_guest SECONDS: until the guest's service answers
    local end=$(( $(date +%s) + ${1:-60} ))
    while [ "$(date +%s)" -lt "$end" ]; do
        [ -n "$(KV_TIMEOUT=1 kv counter)" ] && return 0
        sleep 0.2
    done
    echo "guest did not answer within ${1:-60} s" >&2
    return 1
}
start_guest() {
    xl destroy labguest 2>/dev/null; xl destroy labguest--incoming 2>/dev/null
    xl create /opt/remus/lab/guest.cfg >/dev/null && wait_guest 120
}
running_copies() {  # how many domains named labguest* are running (r or b)
    xl list | awk '$1 ~ /^labguest/ && $5 ~ /^[rb-]+$/' | wc -l
}
# `xl remus -s` and `remusctl protect -s` run "CMD HOST ..."; on one host the
# command is the rest of the line
cat > /usr/local/bin/lab-local <<'EOS'
#!/bin/sh
shift
exec "$@"
EOS
chmod +x /usr/local/bin/lab-local
