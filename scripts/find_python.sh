#!/usr/bin/env bash
# Print the path of a Python >= 3.12 interpreter (JAX 0.11 needs it), or fail with a hint.
# Looks at $PYTHON, then python3.12/python3.13/python3 on PATH, then pyenv's versions (3.12 first:
# the GPU machine runs 3.12).
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }
candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
for name in python3.12 python3.13 python3; do
  path=$(command -v "$name" 2>/dev/null) && candidates+=("$path")
done
roots=()
command -v pyenv >/dev/null 2>&1 && roots+=("$(pyenv root)")
roots+=("${PYENV_ROOT:-$HOME/.pyenv}")
for root in "${roots[@]}"; do
  for path in $(ls -d "$root"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V); do candidates+=("$path"); done
done
for c in "${candidates[@]}"; do
  if ok "$c"; then echo "$c"; exit 0; fi
done
echo "error: no Python >= 3.12 found (tried: ${candidates[*]:-nothing}). Install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12" >&2
exit 1
