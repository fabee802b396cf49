#!/usr/bin/env bash
# The main job on an embedded local target, end to end:
# build custos, create a local repository, back up the bundled sample folder,
# back it up again (incremental), list, restore, compare and verify.
#
#   scripts/quickstart.sh            # repository in target/quickstart/repo
#   KEEP=1 scripts/quickstart.sh     # keep the repository for a look afterwards
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
	PATH="$HOME/.cargo/bin:$PATH"
fi
step() { printf '\n== %s\n' "$*"; }

step "building custos"
cargo build --locked -p custos-agent --bin custos
CUSTOS="$ROOT/target/debug/custos"

WORK="$ROOT/target/quickstart"
rm -rf "$WORK"
mkdir -p "$WORK"
# A demo password; real deployments use --password-file/--password-command.
export CUSTOS_PASSWORD=quickstart-demo-password
export CUSTOS_REPOSITORY="$WORK/repo"
export CUSTOS_CACHE_DIR="$WORK/cache"

step "custos init"
"$CUSTOS" init
step "custos backup (first)"
"$CUSTOS" backup scripts/sample-data --tag quickstart
step "custos backup (second: unchanged files are carried forward)"
"$CUSTOS" backup scripts/sample-data --tag quickstart
step "custos snapshots"
"$CUSTOS" snapshots
step "custos ls latest"
"$CUSTOS" ls latest
step "custos restore latest"
"$CUSTOS" restore latest "$WORK/restored"
diff -r scripts/sample-data "$WORK/restored/sample-data"
echo "restored tree is identical to scripts/sample-data"
step "custos check --read-data"
"$CUSTOS" check --read-data
step "custos stats"
"$CUSTOS" stats

if [[ -z ${KEEP:-} ]]; then
	rm -rf "$WORK"
fi
step "quickstart finished"
