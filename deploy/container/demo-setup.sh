#!/bin/sh
# One-shot set-up steps of the evaluation consortium in compose.yaml (synthetic hospitals, one host).
# The commands are the ones of docs/runbook.md; the shared "exchange" volume stands in for the e-mail
# and the phone call of a real key ceremony (public keys and ca.crt only, never a private key).
#
#   vilref-demo-setup hospital NAME PROFILE SEED LANGUAGE   (needs VILREF_SITE_DIR)
#   vilref-demo-setup coordinator SITE...                   (needs VILREF_CONSORTIUM_DIR)
#
# Both are idempotent: `docker compose up` again reuses what exists.
set -eu
EXCHANGE="${VILREF_EXCHANGE_DIR:-/exchange}"
role="${1:-}"
[ -n "$role" ] && shift

case "$role" in
hospital)
  name="$1" profile="$2" seed="$3" language="$4"
  export_dir="$(dirname "$VILREF_SITE_DIR")/synthetic-export"
  if [ ! -f "$VILREF_SITE_DIR/site.toml" ]; then
    vilref-client synth --out "$export_dir" --n 60 --profile "$profile" --seed "$seed" --dicom
    vilref-client init --site-dir "$VILREF_SITE_DIR" --name "$name" --language "$language" --image-size 64
    vilref-client ingest --site-dir "$VILREF_SITE_DIR" --dicom "$export_dir/dicom" --reports "$export_dir/reports.csv"
  fi
  vilref-client keys create --site-dir "$VILREF_SITE_DIR" --out "$EXCHANGE/$name.pub"
  ;;
coordinator)
  if [ ! -f "$VILREF_CONSORTIUM_DIR/run.toml" ]; then
    vilref-server init --dir "$VILREF_CONSORTIUM_DIR" --host coordinator --port 9092 --model tiny --rounds 3 --local-steps 5 --min-sites 2
  fi
  cp "$VILREF_CONSORTIUM_DIR/pki/ca.crt" "$EXCHANGE/ca.crt"
  for name in "$@"; do
    if ! vilref-server sites --dir "$VILREF_CONSORTIUM_DIR" --json | grep -q "\"name\": \"$name\""; then
      vilref-server add-site "$name" --public-key "$EXCHANGE/$name.pub" --dir "$VILREF_CONSORTIUM_DIR"
    fi
  done
  vilref-server pki show --dir "$VILREF_CONSORTIUM_DIR"
  ;;
*)
  echo "usage: vilref-demo-setup hospital NAME PROFILE SEED LANGUAGE | coordinator SITE..." >&2
  exit 2
  ;;
esac
