# Shared helpers for the scripts in this folder (sourced, not run).

step() { printf '\n==> %s\n' "$*"; }

die() { printf 'error: %s\n' "$*" >&2; exit 1; }

require_root() {
  [ "$(id -u)" = 0 ] || die "run as root: $1 (sudo $0)"
}

# ensure_packages PKG:COMMAND ...  installs each Debian package whose command is missing.
ensure_packages() {
  local missing=() spec
  for spec in "$@"; do
    command -v "${spec#*:}" >/dev/null 2>&1 || missing+=("${spec%%:*}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "install these packages first: ${missing[*]}"
  step "installing ${missing[*]}"
  if [ ! -f /var/lib/apt/periodic/reach-updated ]; then
    apt-get update -qq
    mkdir -p /var/lib/apt/periodic && touch /var/lib/apt/periodic/reach-updated
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_rust_tools() {
  command -v cargo >/dev/null || die "cargo not found: install Rust from https://rustup.rs"
  cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
  cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest
}
