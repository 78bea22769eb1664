# Sourced by the benchmarks that run the coordinator's etcd store: `start_etcd DIR` starts a one-member etcd
# (Debian's etcd-server) on free loopback ports with its data in DIR (removed first), raised transaction
# limits (--max-txn-ops 1024, 10 MiB requests, 8 GiB quota), waits until it answers, sets ETCD_URL, and kills
# it when the script exits.
start_etcd() {
  local data=$1 client peer
  rm -rf "$data"; mkdir -p "$data"
  port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
  client=$(port); peer=$(port)
  etcd --name bench --data-dir "$data/data" --listen-client-urls "http://127.0.0.1:$client" \
    --advertise-client-urls "http://127.0.0.1:$client" --listen-peer-urls "http://127.0.0.1:$peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$peer" --initial-cluster "bench=http://127.0.0.1:$peer" \
    --max-txn-ops 1024 --max-request-bytes 10485760 --quota-backend-bytes 8589934592 > "$data/etcd.log" 2>&1 &
  ETCD_PID=$!
  trap 'kill $ETCD_PID 2>/dev/null || true' EXIT
  for _ in $(seq 100); do
    etcdctl --endpoints "127.0.0.1:$client" endpoint health >/dev/null 2>&1 && break
    sleep 0.1
  done
  ETCD_URL="http://127.0.0.1:$client"
}
