#!/usr/bin/env bash
# An installed baldeagle works like the checkout. Builds the wheel (`pip wheel --no-deps`) from a copy
# of the working tree, installs it with its dependencies into a fresh virtual environment outside the
# checkout, and checks, from a folder outside the checkout, that the package's files are the
# installed ones and that `baldeagle quickstart` resolves the same training settings (the packaged
# quickstart.yaml) as the checkout does. Run by .ci/run before `make test`; 3-4 minutes
# (2.2 min to build, install and check, then 40-100 s to delete the venv, on a busy 2-core machine).
#   bash benchmarks/check_wheel_install.sh          (PYTHON=python3.12, TORCH_SPEC=torch to change them)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"  # the CPU build, from the machine's wheel cache
work="$(mktemp -d "${TMPDIR:-/tmp}/baldeagle-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

# 1. The wheel, built from a copy of the tracked and unignored files (no build/ or egg-info in the checkout).
mkdir "$work/source"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf -) \
  | tar -xf - -C "$work/source"
"$PYTHON" -m venv "$work/venv"
python="$work/venv/bin/python"
"$python" -m pip install -q "$TORCH_SPEC"
"$python" -m pip wheel -q --no-deps -w "$work/dist" "$work/source"
"$python" -m pip install -q "$work"/dist/baldeagle-*.whl

# 2. The same resolver, run on the installed package (from outside the checkout) and on the checkout.
resolve='import json, baldeagle
from baldeagle.config import QuickstartConfig, to_dict
from baldeagle.quickstart import quickstart_train_config
cfg = to_dict(quickstart_train_config(QuickstartConfig(out="runs/quickstart")))
print(json.dumps({"package": baldeagle.__file__, "train": cfg}, sort_keys=True))'
installed="$(cd "$work" && "$python" -c "$resolve")"
checkout="$(cd "$repo" && PYTHONPATH="$repo/src" "$python" -c "$resolve")"
"$python" - "$installed" "$checkout" "$work/venv" "$repo" <<'PY'
import json, sys
installed, checkout = (json.loads(arg) for arg in sys.argv[1:3])
venv, repo = sys.argv[3:5]
assert installed["package"].startswith(venv), f"not the installed package: {installed['package']}"
assert checkout["package"].startswith(repo), f"not the checkout's package: {checkout['package']}"
if installed["train"] != checkout["train"]:
    diff = {k: (v, checkout["train"].get(k)) for k, v in installed["train"].items() if checkout["train"].get(k) != v}
    sys.exit(f"check_wheel_install: installed vs checkout training settings differ: {diff}")
t = installed["train"]
print(f"check_wheel_install: installed quickstart resolves the checkout's settings (ttt_steps {t['ttt_steps']}, "
      f"draft_vocab_size {t['draft_vocab_size']}, learning_rate {t['learning_rate']}, "
      f"batch {t['per_device_train_batch_size']})")
PY
(cd "$work" && "$work/venv/bin/baldeagle" quickstart --help >/dev/null)
echo "check_wheel_install: ok in $((SECONDS - start)) s"
