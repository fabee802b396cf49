#!/usr/bin/env bash
# The main job on an embedded local target, end to end: build custos, create
# a local repository, back up the bundled sample data — email (a folder of
# .eml files and an mbox archive), a Slack export and plain files — back it up
# again (only changes are read), list, find a customer's records, restore,
# compare and verify.
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
SAMPLE="$ROOT/scripts/sample-data"
rm -rf "$WORK"
mkdir -p "$WORK"
# A demo password from a file; real deployments use password_file/password_command.
printf 'quickstart-demo-password\n' >"$WORK/password"
cat >"$WORK/custos.toml" <<TOML
[repository]
password_file = "$WORK/password"
time_zone = "Europe/Lisbon"

[[target]]
name = "local"
url = "$WORK/repo"

[[source]]
name = "tickets"
type = "directory"
paths = ["$SAMPLE/tickets"]

[[source]]
name = "support-inbox"
type = "eml_folder"
path = "$SAMPLE/mail/inbox"
mode = "archive"

[[source]]
name = "mail-archive"
type = "mbox"
path = "$SAMPLE/mail/archive-2025.mbox"
mode = "archive"

[[source]]
name = "slack"
type = "slack_export"
path = "$SAMPLE/slack-export"
mode = "archive"

[retention]
keep_daily = 7
keep_monthly = 12
TOML
export CUSTOS_CONFIG="$WORK/custos.toml"
export CUSTOS_CACHE_DIR="$WORK/cache"

step "custos init"
"$CUSTOS" init
step "custos sources check"
"$CUSTOS" sources check
step "custos backup (every source; first run)"
"$CUSTOS" backup
step "custos backup (second run: nothing changed, nothing is read again)"
"$CUSTOS" backup
step "custos snapshots"
"$CUSTOS" snapshots
step "custos ls (latest mbox snapshot)"
"$CUSTOS" ls "$("$CUSTOS" --json snapshots --source mail-archive | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["short_id"])')"
step "custos find --customer ana.lima@example.org (metadata only, no bodies read)"
"$CUSTOS" find --customer ana.lima@example.org
step "custos customer show ana.lima@example.org (the customer index: sources, counts, first and last contact)"
"$CUSTOS" customer show ana.lima@example.org
step "custos customer export ana.lima@example.org (an access request: originals, manifest.json, index.md)"
"$CUSTOS" customer export ana.lima@example.org --out "$WORK/ana-export"
ls -R "$WORK/ana-export" | head -20
step "custos restore (latest snapshot of each source)"
for src in tickets support-inbox mail-archive slack; do
	id=$("$CUSTOS" --json snapshots --source "$src" | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["short_id"])')
	"$CUSTOS" restore "$id" "$WORK/restored/$src"
done
diff -r "$SAMPLE/tickets" "$WORK/restored/tickets/tickets"
for f in "$SAMPLE"/mail/inbox/*.eml; do
	# each restored .eml is byte-identical to a source message
	cmp -s "$f" "$(grep -rlF "$(grep -m1 '^Message-ID' "$f")" "$WORK/restored/support-inbox")" || { echo "mismatch: $f"; exit 1; }
done
echo "restored files and messages are identical to the sample data"
step "custos forget --dry-run (the [retention] policy, explained)"
"$CUSTOS" forget --dry-run
step "custos check --read-data"
"$CUSTOS" check --read-data
step "custos stats"
"$CUSTOS" stats
step "custos audit log (who did what; hash-chained) and audit verify"
"$CUSTOS" audit log
"$CUSTOS" audit verify

if [[ -z ${KEEP:-} ]]; then
	rm -rf "$WORK"
fi
step "quickstart finished"
