#!/usr/bin/env bash
# Per-instruction profile of one kernel launch with Nsight Compute: executed instructions
# and warp-stall samples for every SASS instruction (the SourceCounters section), plus the
# usual summary sections, exported as CSV so they can be read without the GUI.
#
#   bash bench/ncu_source.sh PREFIX KERNEL_REGEX LAUNCH_SKIP -- COMMAND [ARGS...]
#
# Writes PREFIX.details.csv (speed of light, occupancy, warp states, scheduler, instruction
# mix), PREFIX.sass.csv (one row per SASS instruction: address, source, executed
# instructions, stall samples by reason) and appends ncu's output to PREFIX.log; the
# .ncu-rep itself is deleted (the device tool returns few files).
# Summarize locally: python bench/ncu_sass_summary.py PREFIX.sass.csv
# Clocks are left alone (--clock-control none, as the device notes ask).
set -euo pipefail
if [ $# -lt 5 ] || [ "$4" != "--" ]; then
  echo "usage: $0 PREFIX KERNEL_REGEX LAUNCH_SKIP -- COMMAND [ARGS...]" >&2
  exit 2
fi
prefix=$1; regex=$2; skip=$3; shift 4
ncu --clock-control none --kernel-name "regex:$regex" --launch-skip "$skip" --launch-count 1 \
  --section SpeedOfLight --section Occupancy --section WarpStateStats \
  --section SchedulerStats --section InstructionStats --section SourceCounters \
  --section LaunchStats --section MemoryWorkloadAnalysis \
  -f -o "$prefix" "$@" >> "$prefix.log" 2>&1
ncu -i "$prefix.ncu-rep" --page details --csv > "$prefix.details.csv"
ncu -i "$prefix.ncu-rep" --page source --csv --print-source sass > "$prefix.sass.csv"
rm -f "$prefix.ncu-rep"
