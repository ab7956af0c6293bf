# Shared helpers for the scripts in this folder (sourced, not run).

step() { printf '\n==> %s\n' "$*"; }

die() { printf 'error: %s\n' "$*" >&2; exit 1; }

require_root() {
  [ "$(id -u)" = 0 ] || die "run as root: $1 (sudo $0)"
}

# ensure_packages PKG[:COMMAND] ...  installs each Debian package that is
# missing: looked for by its command when one is given, else by dpkg (for
# libraries and headers, which have no command).
ensure_packages() {
  local missing=() spec
  for spec in "$@"; do
    if [[ $spec == *:* ]]; then
      command -v "${spec#*:}" >/dev/null 2>&1 && continue
    else
      dpkg -s "$spec" >/dev/null 2>&1 && continue
    fi
    missing+=("${spec%%:*}")
  done
  apt_install "${missing[@]}"
}

# apt_install PKG ...  installs the packages (none: nothing to do).
apt_install() {
  [ $# -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "install these packages first: $*"
  step "installing $*"
  if [ ! -f /var/lib/apt/periodic/reach-updated ]; then
    apt-get update -qq
    mkdir -p /var/lib/apt/periodic && touch /var/lib/apt/periodic/reach-updated
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_rust_tools() {
  command -v cargo >/dev/null || die "cargo not found: install Rust from https://rustup.rs"
  cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
  cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest
}

# ensure_cargo_tool CRATE [BUILD-DEPS...]  installs a comparison baseline from
# crates.io when its command (named like the crate) is missing.
ensure_cargo_tool() {
  local crate=$1; shift
  command -v "$crate" >/dev/null 2>&1 && return 0
  [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/$crate" ] && return 0
  ensure_packages "$@"
  step "cargo install $crate (a baseline the tests compare with; a few minutes, once)"
  cargo install --quiet "$crate" || die "cargo install $crate failed"
}
