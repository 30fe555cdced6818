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
echo "swagger-ui-dist $SWAGGER and redoc $REDOC in $OUT"
