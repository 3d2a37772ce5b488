# Remus with remusctl on the lab's PV guest, the primary killed (SIGKILL) after a
# while: prints FIGURE lines and what the secondary serves afterwards.
# Primary and secondary share this dom0 (as `xl remus ... localhost` does); the
# replication runs over `-s` (both channels on a command's stdin and stdout).
source /opt/remus/lab/lib.sh
start_guest || exit 1
pdom=$(xl domid labguest)
boot=$(kv boot)
report() {  # why each side ended (the secondary's reason is only in its status file)
  for f in /tmp/remus/labguest.json /tmp/remus-b/labguest*.json; do
    [ -e "$f" ] && python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print('status', d['role'], d['state'], d['checkpoints'], 'reason:', d['reason'])" "$f"
  done
  grep -v "^ \|Frames\|^  File" /tmp/protect.log | tail -8
}
# no status files of an earlier run in this lab: cps would read their count
rm -rf /tmp/remus-b /tmp/remus/labguest.json
mkdir -p /tmp/remus-b
# Timeouts for TCG: a cold `python3 -m orchestrator.cli` takes 7-8 s in this dom0 when
# the host is idle (-X importtime: orchestrator.cli 8.4 s), several times that when it is
# busy, and the primary waits for the receiver's HELLO for the ACK timeout: 30 s was
# missed once ("remusctl: " and an empty TimeoutError). 3 s without a byte from the
# primary once made the secondary fail over under a loaded host. The SIGKILL below is
# seen at once either way (the link's pipes close), so neither figure is affected.
HB=${HEARTBEAT_TIMEOUT_MS:-10000} ACK=${ACK_TIMEOUT_MS:-60000}
python3 -m orchestrator.cli --backend xen protect labguest --foreground -s "" --to "env REMUS_STATE_DIR=/tmp/remus-b python3 -m orchestrator.cli --backend xen receive --stdio --heartbeat-timeout $HB --ack-timeout $ACK" -n -d -F -i ${INTERVAL:-200} --heartbeat-timeout $HB --ack-timeout $ACK > /tmp/protect.log 2>&1 &
cps() { python3 -c "import json;print(json.load(open('/tmp/remus/labguest.json'))['checkpoints'])" 2>/dev/null || echo 0; }
t0=$(now)
# 43-74 s here (two Python start-ups, the fence's, the 96 MiB first copy)
until [ "$(cps)" -ge 3 ]; do sleep 0.5; [ $(echo "$(now) $t0" | awk '{print ($1-$2 > 180)}') = 1 ] && { echo "no checkpoint in 180 s"; report; exit 1; }; done
echo "FIGURE ours_first_checkpoints_s $(echo "$(now) $t0" | awk '{print $1-$2}')"
c0=$(cps); s0=$(now)
for i in $(seq 1 ${KEYS:-20}); do kv put=k$i=v$i >/dev/null; sleep 0.5; done
c1=$(cps); s1=$(now)
echo "FIGURE ours_checkpoints_per_s $(echo "$c1 $c0 $s1 $s0" | awk '{print ($1-$2)/($3-$4)}')"
python3 -m orchestrator.cli --backend xen status --local 2>&1 | tail -2
pkill -9 -f "orchestrator.cli --backend xen protect"; t0=$(now)
while :; do
  if ! xl list $pdom >/dev/null 2>&1 && [ -n "$(KV_TIMEOUT=1 kv counter)" ]; then break; fi
  [ $(echo "$(now) $t0" | awk '{print ($1-$2 > 60)}') = 1 ] && { echo "no failover in 60 s"; break; }
  sleep 0.1
done
echo "FIGURE ours_failover_s $(echo "$(now) $t0" | awk '{print $1-$2}')"
sleep 1; xl list; echo "copies=$(running_copies)"
echo "boot_same=$([ "$(kv boot)" = "$boot" ] && echo yes || echo no)"
for i in 1 5 10 15; do echo "k$i=$(kv get=k$i)"; done
report
cp /tmp/protect.log /mnt/lab/
