#!/bin/bash
# A test extension in bash + curl: registers, records each event as a JSON line in $EXT_LOG.
set -euo pipefail
NAME=$(basename "$0")
API="http://${AWS_LAMBDA_RUNTIME_API}/2020-01-01/extension"
HEADERS=$(mktemp)
curl -sS -D "$HEADERS" -o /dev/null -X POST "$API/register" \
     -H "Lambda-Extension-Name: $NAME" -d '{"events": ["INVOKE", "SHUTDOWN"]}'
ID=$(grep -i '^Lambda-Extension-Identifier:' "$HEADERS" | cut -d: -f2 | tr -d ' \r\n')
echo "{\"ext\": \"$NAME\", \"pid\": $$, \"what\": \"registered\", \"id\": \"$ID\"}" >> "$EXT_LOG"
while true; do
    EVENT=$(curl -sS "$API/event/next" -H "Lambda-Extension-Identifier: $ID")
    echo "{\"ext\": \"$NAME\", \"pid\": $$, \"what\": \"event\", \"event\": $EVENT}" >> "$EXT_LOG"
    echo "[$NAME] received $EVENT"
    case "$EVENT" in
        *SHUTDOWN*) exit 0 ;;
    esac
done
