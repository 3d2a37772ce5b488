# Remus with remusctl on the lab's PV guest, the *secondary's* orchestrator killed
# (SIGKILL) once checkpoints flow: xl migrate-receive must not take the guest over
# (its input would end, which it reads as the primary's failure), and the primary
# must run on alone. Prints the copies running afterwards and why each side ended.
source /opt/remus/lab/lib.sh
start_guest || exit 1
pdom=$(xl domid labguest)
rm -rf /tmp/remus-b /tmp/remus/labguest.json
mkdir -p /tmp/remus-b
HB=${HEARTBEAT_TIMEOUT_MS:-10000} ACK=${ACK_TIMEOUT_MS:-60000}  # TCG: see remus-ours.sh
python3 -m orchestrator.cli --backend xen protect labguest --foreground -s "" --to "env REMUS_STATE_DIR=/tmp/remus-b python3 -m orchestrator.cli --backend xen receive --stdio --heartbeat-timeout $HB --ack-timeout $ACK" -n -d -F -i ${INTERVAL:-200} --heartbeat-timeout $HB --ack-timeout $ACK > /tmp/protect-sd.log 2>&1 &
cps() { python3 -c "import json;print(json.load(open('/tmp/remus/labguest.json'))['checkpoints'])" 2>/dev/null || echo 0; }
t0=$(now)
until [ "$(cps)" -ge 3 ]; do sleep 0.5; [ $(echo "$(now) $t0" | awk '{print ($1-$2 > 180)}') = 1 ] && { echo "no checkpoint in 180 s"; tail -20 /tmp/protect-sd.log; exit 1; }; done
echo "guards=$(pgrep -fc orchestrator.protection.xl_guard)"
ps -eo pid,ppid,args | grep -E "xl |xl_guard|save-helper|orchestrator.cli" | grep -v grep
# anchored: the primary's own command line holds the receiver's (its --to)
pkill -9 -f "^python3 -m orchestrator.cli --backend xen receive"; t0=$(now)
# the primary sees its link end and runs on; give xl (if it were to fail over) time
until ! pgrep -f "^python3 -m orchestrator.cli --backend xen protect" >/dev/null; do
  sleep 0.5; [ $(echo "$(now) $t0" | awk '{print ($1-$2 > 90)}') = 1 ] && { echo "the primary did not end in 90 s"; break; }
done
sleep 10
xl list
echo "incoming=$(xl list | awk '$1 == "labguest--incoming"' | wc -l)"
ps -eo pid,ppid,args | grep -E "xl |xl_guard|save-helper|orchestrator.cli" | grep -v grep
echo "xl_receivers=$(pgrep -fc '^/usr/lib/xen-[0-9.]*/bin/xl .*migrate-receive')"
echo "primary_same=$([ "$(xl domid labguest 2>/dev/null)" = "$pdom" ] && echo yes || echo no)"
echo "copies=$(running_copies)"
echo "answers=$([ -n "$(KV_TIMEOUT=3 kv counter)" ] && echo yes || echo no)"
python3 -c "import json;d=json.load(open('/tmp/remus/labguest.json'));print('status', d['role'], d['state'], 'reason:', d['reason'])"
grep -h -A12 "remus-xl-guard" /tmp/protect-sd.log
