#!/bin/sh
# gpulease unload adapter for ollama: unloads every model ollama has loaded
# (`keep_alive: 0` frees it at once). Configure it as
#   [consumers.ollama]
#   unload = { command = ["/path/to/contrib/ollama-unload.sh"] }
# OLLAMA_HOST picks another server (default http://127.0.0.1:11434).
set -eu
ollama=${OLLAMA_HOST:-http://127.0.0.1:11434}
curl -fsS "$ollama/api/ps" |
  python3 -c 'import json, sys; print("\n".join(m["name"] for m in json.load(sys.stdin).get("models", [])))' |
  while read -r model; do
    [ -n "$model" ] || continue
    curl -fsS "$ollama/api/generate" -d "{\"model\": \"$model\", \"keep_alive\": 0}" >/dev/null
  done
