#!/usr/bin/env bash
# Runs the abuse suite in one command: every attack of step 8 tried against
# real reach processes (reach-lab's abuse tests in network namespaces), and
# the attacks shown on loopback with real processes elsewhere (a proxy port
# across a hub restart, a node that stops reading, hub-to-hub admission).
# docs/security.md lists each threat, its defence and these tests. Needs
# root; installs what it needs like scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

require_root "the abuse tests create network namespaces"
ensure_packages iproute2:ip nftables:nft socat:socat python3:python3
ensure_rust_tools

step "abuse suite (cargo nextest)"
cargo nextest run --workspace --locked --no-fail-fast -E '
  binary(abuse)
  | test(=a_second_node_cannot_take_a_first_nodes_proxy_port_across_a_hub_restart)
  | test(=a_node_that_stops_reading_costs_its_hub_at_most_its_link_queue)
  | test(=proxy_port_clients_are_capped_per_source_and_a_silent_one_is_cut)
  | test(=one_peer_cannot_take_more_than_its_share_of_an_exposed_service)
  | test(=tests::hubs_link_only_by_their_own_credential_checked_both_ways)
  | test(=tests::a_linked_hub_advertising_forged_route_state_is_cut_and_takes_no_route)
  | test(=tests::a_linked_hub_cannot_forge_alter_or_freeze_another_hubs_directory)
  | test(=tests::a_linked_hub_listing_a_node_it_does_not_have_cannot_take_it)
  | test(=links_that_do_not_register_are_bounded_per_source_and_cut_at_their_deadline)'
