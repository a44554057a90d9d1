#!/usr/bin/env bash
# The calibrl verl plugin (calibrl.integrations.verl) inside verl 0.9.1: its registered policy loss and advantage
# estimator, looked up through verl's own registries, return calibrl's numbers on verl-shaped batches, and the
# policy term equals verl's vanilla loss when the guidance is off. Builds/reuses the separate .verl-venv of
# verl_parity.sh. Output saved in benchmarks/verl_plugin_output.txt by:
#   bash benchmarks/verl_plugin.sh 2>&1 | tee benchmarks/verl_plugin_output.txt
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VERL_TESTS="tests/test_integrations_verl.py" exec bash "$HERE/verl_parity.sh" "$@"
