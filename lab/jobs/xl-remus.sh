# The same guest under Debian's own `xl remus` (-F -n -d: its libxl has no
# network buffering or disk replication), its primary killed the same way.
source /opt/remus/lab/lib.sh
start_guest || exit 1
pdom=$(xl domid labguest)
boot=$(kv boot)
xl -vvv remus -F -n -d -i ${INTERVAL:-200} -s lab-local labguest localhost > /tmp/xlremus.log 2>&1 &
xlpid=$!
cps() { grep -c "guest has suspended" /tmp/xlremus.log; }
t0=$(now)
until [ "$(cps)" -ge 3 ]; do sleep 0.5; [ $(echo "$(now) $t0" | awk '{print ($1-$2 > 120)}') = 1 ] && { echo "no checkpoint in 120 s"; exit 1; }; done
echo "FIGURE xl_first_checkpoints_s $(echo "$(now) $t0" | awk '{print $1-$2}')"
c0=$(cps); s0=$(now)
for i in $(seq 1 ${KEYS:-20}); do kv put=k$i=v$i >/dev/null; sleep 0.5; done
c1=$(cps); s1=$(now)
echo "FIGURE xl_checkpoints_per_s $(echo "$c1 $c0 $s1 $s0" | awk '{print ($1-$2)/($3-$4)}')"
kill -9 $xlpid; t0=$(now)
# failover: the incoming copy unpaused (xl names it labguest--incoming while the
# original still has the name)
while :; do
  xl list | awk '$1 == "labguest--incoming" && $5 ~ /^[rb-]+$/ {f=1} END {exit !f}' && break
  [ $(echo "$(now) $t0" | awk '{print ($1-$2 > 60)}') = 1 ] && { echo "no failover in 60 s"; break; }
  sleep 0.1
done
echo "FIGURE xl_failover_s $(echo "$(now) $t0" | awk '{print $1-$2}')"
sleep 2; xl list; echo "copies=$(running_copies)"
xl destroy labguest--incoming 2>/dev/null; xl destroy labguest 2>/dev/null
true
