#!/usr/bin/env bash
# Refreshes app/static/docs: the Swagger UI and ReDoc files that /docs and /redoc serve from the
# package (FastAPI would load them from a CDN, which an offline cluster cannot reach). Needs npm.
#   scripts/vendor_docs_assets.sh [swagger-ui-dist version] [redoc version]
set -euo pipefail
SWAGGER=${1:-5.35.0}
REDOC=${2:-2.5.4}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
npm pack --silent "swagger-ui-dist@$SWAGGER" "redoc@$REDOC" >/dev/null
mkdir swagger redoc
tar xzf swagger-ui-dist-*.tgz -C swagger
tar xzf redoc-*.tgz -C redoc
OUT="$ROOT/app/static/docs"
mkdir -p "$OUT/swagger-ui" "$OUT/redoc"
cp swagger/package/{swagger-ui-bundle.js,swagger-ui.css,LICENSE,NOTICE} "$OUT/swagger-ui/"
cp redoc/package/bundles/redoc.standalone.js redoc/package/bundles/redoc.standalone.js.LICENSE.txt \
   redoc/package/LICENSE "$OUT/redoc/"
# ReDoc draws Redocly's logo from cdn.redoc.ly in its sidebar, with no option to turn it off:
# an offline page must not reach out, so the logo becomes an empty inline image (the
# "API docs by Redocly" credit stays).
sed -i 's|src:"https://cdn.redoc.ly/redoc/logo-mini.svg"|src:"data:image/svg+xml,%3Csvg xmlns=%22http://www.w3.org/2000/svg%22/%3E"|' \
  "$OUT/redoc/redoc.standalone.js"
grep -q 'cdn.redoc.ly' "$OUT/redoc/redoc.standalone.js" && { echo "ReDoc still loads from cdn.redoc.ly" >&2; exit 1; }
echo "swagger-ui-dist $SWAGGER and redoc $REDOC in $OUT"
