#!/usr/bin/env bash
# Runs the units of dist/ under systemd as PID 1, as a host would: systemd
# boots in fresh PID, mount, network, UTS and IPC namespaces, the units and
# files are installed where docs/deploy.md says, and each service must
# start with its hardening, do its work and stop cleanly:
#   reach-hub        answers on its metrics port, runs as a dynamic user (not
#                    root), keeps its key in its state directory, admits a
#                    node by the network secret systemd handed it
#                    (LoadCredential), restarts when killed, stops cleanly;
#   reach-gateway    creates its nftables table with only CAP_NET_ADMIN;
#   reach-vpn@office joins the hub with its credential and brings its TUN
#                    device up.
# Needs the reach binary scripts/check-dist.sh installs (it runs first).
#
# Nothing of the host may change: the booted system sees the host's /etc,
# /usr/local and /var through overlays whose upper layers are ours, and a
# tmpfs of its own on /tmp and /run. Every unit the host has is masked in
# its /etc, so only the units under test and their targets start: without
# that, a service's default dependencies pull in sysinit.target, whose
# systemd-tmpfiles-setup empties /tmp (found the hard way: it did, once).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages systemd:/lib/systemd/systemd curl:curl nftables:nft iproute2:ip util-linux:nsenter procps:pgrep python3:python3
dist="$PWD/dist"
reach="$PWD/target/tmp/dist-root/usr/local/bin/reach"
[ -x "$reach" ] || die "no $reach: run scripts/check-dist.sh first"
mkdir -p target/tmp
work=$(mktemp -d "$PWD/target/tmp/systemd.XXXXXX")
unshare_pid=""
cleanup() {
  if [ -n "${REACH_SYSTEMD_KEEP:-}" ] && [ -n "$unshare_pid" ]; then
    echo "REACH_SYSTEMD_KEEP: left running; enter with nsenter -t $(pgrep -P "$unshare_pid" | head -n1) -m -p -n -u -i, end with kill -KILL $unshare_pid"
    return
  fi
  if [ -n "$unshare_pid" ]; then
    # PID 1 of the namespace ignores SIGTERM; SIGKILL ends it and with it
    # every process inside.
    pkill -KILL -P "$unshare_pid" 2>/dev/null || true
    kill -KILL "$unshare_pid" 2>/dev/null || true
    wait "$unshare_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/boot.sh" <<EOF
set -e
mount --make-rprivate /
for d in etc usr/local var; do
  name=\${d//\//-}
  mkdir -p "$work/\$name-upper" "$work/\$name-work"
  mount -t overlay overlay -o "lowerdir=/\$d,upperdir=$work/\$name-upper,workdir=$work/\$name-work" "/\$d"
done
mount -t tmpfs tmpfs /tmp
# systemd expects a shared root (systemd.io/CONTAINER_INTERFACE): services'
# credentials are moved into place through it. The peer groups are new,
# this namespace's alone, since every mount was made private first.
mount --make-rshared /
# Mask every unit the host has, in the overlay's /etc (which wins over
# every other unit directory): none of them may start here.
for dir in /etc/systemd/system /usr/local/lib/systemd/system /lib/systemd/system /usr/lib/systemd/system; do
  [ -d "\$dir" ] || continue
  for unit in "\$dir"/*.service "\$dir"/*.socket "\$dir"/*.timer "\$dir"/*.path "\$dir"/*.mount "\$dir"/*.automount "\$dir"/*.swap; do
    [ -e "\$unit" ] || [ -L "\$unit" ] || continue
    name=\${unit##*/}
    # The journal stays: the services' output goes there.
    case "\$name" in reach-*|systemd-journald.service|systemd-journald*.socket) continue ;; esac
    ln -sfn /dev/null "/etc/systemd/system/\$name"
  done
done
# Boot into a target of its own: nothing of the host's is started.
printf '[Unit]\nDescription=reach units under test\nDefaultDependencies=no\nWants=systemd-journald.service\n' \
  > /etc/systemd/system/reach-test.target
exec env container=reach-test /lib/systemd/systemd --system --unit=reach-test.target
EOF
unshare --pid --fork --mount --net --uts --ipc --mount-proc bash "$work/boot.sh" \
  > "$work/boot.log" 2>&1 &
unshare_pid=$!

# inside CMD...: runs CMD inside the booted system's namespaces.
pid1=""
inside() { nsenter -t "$pid1" -m -p -n -u -i -- "$@"; }

# wait_for SECONDS WHAT CMD...: until CMD succeeds, or fail naming WHAT.
wait_for() {
  local secs=$1 what=$2
  shift 2
  local until=$((SECONDS + secs))
  until "$@" > /dev/null 2>&1; do
    [ "$SECONDS" -lt "$until" ] || die "$what not within ${secs} s"
    sleep 0.2
  done
}

step "systemd as PID 1"
find_pid1() { pid1=$(pgrep -P "$unshare_pid" | head -n1); [ -n "$pid1" ]; }
wait_for 10 "systemd to start" find_pid1
booted() { state=$(inside systemctl is-system-running 2>/dev/null || true); [[ $state == running || $state == degraded ]]; }
wait_for 30 "systemd to finish booting ($(cat "$work/boot.log"))" booted
echo "systemd $(inside systemctl --version | head -n1 | cut -d' ' -f2) is PID 1 (host PID $pid1): $(inside systemctl is-system-running || true)"
inside ip link set lo up

# show UNIT: the journal has no daemon here; the unit's state and its
# process's output (systemd sends it to the console) on failure.
show() { inside systemctl status --no-pager "$1" || true; inside journalctl --no-pager -n 30 -u "$1" || true; }
active() { [ "$(inside systemctl is-active "$1")" = active ]; }
prop() { inside systemctl show -p "$2" --value "$1"; }

step "reach-hub.service"
inside install -m 0755 "$reach" /usr/local/bin/reach
inside install -d -m 0755 /etc/reach
inside install -m 0644 "$dist"/hub.toml /etc/reach/hub.toml
inside sh -c 'head -c 32 /dev/urandom | base64 > /etc/reach/network.secret; head -c 32 /dev/urandom | base64 > /etc/reach/hub.secret; chmod 0600 /etc/reach/*.secret'
inside install -m 0644 "$dist"/reach-hub.service "$dist"/reach-gateway.service ""$dist"/reach-vpn@.service" /etc/systemd/system/
inside systemctl daemon-reload
inside systemctl start reach-hub.service || { show reach-hub; die "reach-hub did not start"; }
status() { inside curl -sf http://127.0.0.1:9770/status; }
wait_for 20 "reach-hub's metrics port ($(show reach-hub))" status
hub_id=$(status | python3 -c 'import json,sys; print(json.load(sys.stdin)["hub"])')
main=$(prop reach-hub MainPID)
user=$(inside ps -o user= -p "$main")
[ "$user" != root ] || die "reach-hub runs as root"
inside test -s /var/lib/private/reach-hub/identity.key || die "no identity key in the state directory: $(inside ls -la /var/lib/private/reach-hub)"
echo "hub $hub_id runs as $user (PID $main), key in /var/lib/reach-hub"
# The credential admits: a node proving the network secret gets the status.
inside "$reach" --state-dir "$work/node" status --json --hub "$hub_id@127.0.0.1:7700" \
  --network-secret-file /etc/reach/network.secret > "$work/node-status.json" \
  || die "a node with the network secret was not admitted: $(cat "$work/node-status.json")"
# Restart=on-failure: a killed hub comes back with the same identity.
inside kill -KILL "$main"
restarted() { active reach-hub && [ "$(prop reach-hub MainPID)" != "$main" ] && status; }
wait_for 20 "reach-hub to restart after SIGKILL" restarted
[ "$(status | python3 -c 'import json,sys; print(json.load(sys.stdin)["hub"])')" = "$hub_id" ] \
  || die "the restarted hub has another identity"
echo "killed, restarted by systemd as $hub_id"
inside systemctl stop reach-hub.service
[ "$(prop reach-hub Result)" = success ] || { show reach-hub; die "reach-hub did not stop cleanly: $(prop reach-hub Result)"; }
echo "stopped: $(prop reach-hub Result), exit status $(prop reach-hub ExecMainStatus)"
inside systemctl start reach-hub.service
wait_for 20 "reach-hub to start again" status

step "reach-gateway.service"
# The interfaces gateway.env names: eth0 the WAN, eth1 the LAN.
inside ip link add eth0 type veth peer name eth1
inside ip addr add 192.0.2.1/24 dev eth0
inside ip addr add 192.168.1.1/24 dev eth1
inside ip link set eth0 up
inside ip link set eth1 up
inside install -m 0644 "$dist"/gateway.env /etc/reach/gateway.env
inside systemctl start reach-gateway.service || { show reach-gateway; die "reach-gateway did not start"; }
table() { inside nft list table ip reach_gateway; }
wait_for 20 "reach-gateway's nftables table ($(show reach-gateway))" table
active reach-gateway || { show reach-gateway; die "reach-gateway is not active"; }
echo "reach-gateway is active as $(inside ps -o user= -p "$(prop reach-gateway MainPID)") and made its nftables table"
inside systemctl stop reach-gateway.service
[ "$(prop reach-gateway Result)" = success ] || { show reach-gateway; die "reach-gateway did not stop cleanly"; }

step "reach-vpn@office.service"
inside cp /etc/reach/network.secret /etc/reach/vpn-office.secret
inside chmod 0600 /etc/reach/vpn-office.secret
inside sh -c "echo 'REACH_VPN_ARGS=\"--hub $hub_id@127.0.0.1:7700\"' > /etc/reach/vpn-office.env"
inside systemctl start reach-vpn@office.service || { show reach-vpn@office; die "reach-vpn@office did not start"; }
tun_up() { inside ip -o link show | grep -q 'reach0'; }
wait_for 30 "reach-vpn@office's TUN device ($(show reach-vpn@office))" tun_up
active reach-vpn@office || { show reach-vpn@office; die "reach-vpn@office is not active"; }
echo "reach-vpn@office is active: $(inside ip -o -4 addr show | grep reach0 | awk '{print $2, $4}')"
inside systemctl stop reach-vpn@office.service
[ "$(prop reach-vpn@office Result)" = success ] || { show reach-vpn@office; die "reach-vpn@office did not stop cleanly"; }
inside systemctl stop reach-hub.service
echo "the three units ran under systemd and stopped cleanly"
