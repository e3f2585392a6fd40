#!/usr/bin/env bash
# One-off mutation run (issue 14) of one skinrecords module against its fast tests; not part of CI.
#   tools/mutation/run.sh MODULE [MUTANT_GLOB ...]
# MODULE is splits, metrics, pipeline or selection (TESTS below); MUTANT_GLOBs restrict the run to
# some functions, e.g. 'skinrecords.input.pipeline.x__check__mutmut_*'. Environment: ISOLATION (fork |
# forkserver, default fork), CHILDREN (parallel mutants, default 1). The checkout is copied to
# $MUT_ROOT/MODULE (default /tmp/skinrecords-mutation) with a pyproject.toml holding the mutmut
# config, so setup.cfg and the checkout stay untouched. Results: MUT_ROOT/MODULE/results.txt.
set -euo pipefail
module=${1:?usage: run.sh MODULE [MUTANT_GLOB ...]}
shift
isolation=${ISOLATION:-fork}
children=${CHILDREN:-1}
repo=$(cd "$(dirname "$0")/../.." && pwd)
declare -A TESTS=(
  [splits]='"tests/test_splits.py"'
  [metrics]='"tests/test_metrics.py", "tests/test_evaluate.py::test_youden_threshold_hand_made", "tests/test_evaluate.py::test_compute_metrics_equal_sklearn_and_collapse"'
  [selection]='"tests/test_selection.py"'
  [pipeline]='"tests/test_pipeline.py"'
)
[[ -n ${TESTS[$module]:-} ]] || { echo "no test list for $module: add it to TESTS in $0" >&2; exit 2; }
# The module's file, flat or in its sub-package (tools/relayout.py).
source=$(cd "$repo" && ls skinrecords/$module.py skinrecords/*/$module.py 2>/dev/null | head -n 1)
[[ -n $source ]] || { echo "no skinrecords module $module" >&2; exit 2; }
work=${MUT_ROOT:-/tmp/skinrecords-mutation}/$module
rm -rf "$work" && mkdir -p "$work"
# Tracked and untracked-but-not-ignored files: the working tree as it is, without build outputs.
(cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$work")
cat > "$work/pyproject.toml" <<TOML
[tool.mutmut]
source_paths = ["skinrecords"]
only_mutate = ["$source"]
pytest_add_cli_args_test_selection = [${TESTS[$module]}]
pytest_add_cli_args = ["-x", "-q"]
process_isolation = "$isolation"
TOML
cd "$work"
start=$(date +%s)
nice -n 10 mutmut run --max-children "$children" "$@" > run.log 2>&1 || true
mutmut results --all true > results.txt 2>&1 || mutmut results > results.txt 2>&1 || true
echo "$module: $(( $(date +%s) - start )) s"
python "$repo/tools/mutation/score.py" results.txt
