#!/usr/bin/env bash
# The README's Slurm job array, on a real Slurm: a single-node cluster on this machine
# (Debian's slurmctld, slurmd and munge, localhost only), the README's job script submitted with
# `sbatch --array` over the experiments given (a [sweep] grid of a few points), then checked:
#
#   1. every point is started by exactly one array task (its shard), and a task killed with
#      scancel while it trains leaves its run resumable (`interrupted`, or `stopped` if killed
#      hard) and starts none of its shard's later points;
#   2. resubmitting the same array skips the points that completed (their tables untouched),
#      resumes the killed run (same run id, its log shows the resume) and runs the rest;
#   3. `runner results` over the shared folder shows every point exactly once, `completed`.
#
# Usage: tools/slurm_check.sh RUNNER_BINARY EXPERIMENTS_DIR RESULTS_DIR
#   RESULTS_DIR should be empty or absent. Runs as root; installs slurmctld, slurmd, munge and
#   slurm-client with apt-get when missing. The cluster's config, state, logs and the jobs'
#   outputs live in a temporary folder (removed at exit, kept with SLURM_CHECK_KEEP=1); the
#   daemons are stopped at exit.
# Environment: SLURM_CHECK_TASKS (array size, default 3), SLURM_CHECK_TIMEOUT (seconds per
#   array, default 600).
# Exit status: 0 all checks held, 1 a check failed, 2 usage, 3 Slurm could not be set up here
#   (not root, no apt-get, daemons would not start).
set -euo pipefail

readonly EXIT_FAIL=1 EXIT_USAGE=2 EXIT_NO_SLURM=3

if [[ $# -ne 3 ]]; then
    echo "usage: $0 RUNNER_BINARY EXPERIMENTS_DIR RESULTS_DIR" >&2
    exit "$EXIT_USAGE"
fi
RUNNER=$(realpath "$1")
EXPERIMENTS=$(realpath "$2")
RESULTS=$(realpath -m "$3")
README=$(dirname "$(realpath "$0")")/../README.md
TASKS=${SLURM_CHECK_TASKS:-3}
TIMEOUT=${SLURM_CHECK_TIMEOUT:-600}
[[ -x $RUNNER ]] || { echo "not an executable: $RUNNER" >&2; exit "$EXIT_USAGE"; }
[[ -d $EXPERIMENTS ]] || { echo "not a folder: $EXPERIMENTS" >&2; exit "$EXIT_USAGE"; }
[[ -f $README ]] || { echo "no README.md beside tools/: $README" >&2; exit "$EXIT_USAGE"; }

# The daemons live in sbin, which a user's (or cargo's) PATH may lack.
export PATH=$PATH:/usr/sbin:/sbin

say() { printf 'slurm_check: %s\n' "$*"; }
no_slurm() { say "cannot set up Slurm here: $*" >&2; exit "$EXIT_NO_SLURM"; }

# ---------------------------------------------------------------------------------------------
# Install.

[[ $(id -u) -eq 0 ]] || no_slurm "not root (the daemons run as root)"
need=()
for pair in slurmctld:slurmctld slurmd:slurmd munged:munge sbatch:slurm-client; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if ((${#need[@]})); then
    command -v apt-get >/dev/null || no_slurm "missing ${need[*]} and no apt-get"
    say "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The packages' scripts would start their services (with the default config): not here.
    policy=
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
    fi
    apt_log=$(mktemp /tmp/slurm-check-apt.XXXXXX)
    installed=0
    if apt-get install -y -qq --no-install-recommends "${need[@]}" >"$apt_log" 2>&1; then
        installed=1
    else
        apt-get update -qq >>"$apt_log" 2>&1 || true
        apt-get install -y -qq --no-install-recommends "${need[@]}" >>"$apt_log" 2>&1 && installed=1
    fi
    [[ -z $policy ]] || rm -f "$policy"
    if ((!installed)); then
        tail -20 "$apt_log" >&2
        rm -f "$apt_log"
        no_slurm "apt-get install ${need[*]} failed"
    fi
    rm -f "$apt_log"
fi

# ---------------------------------------------------------------------------------------------
# A single-node cluster in a temporary folder.

WORK=$(mktemp -d /tmp/slurm-check.XXXXXX)
# Root only; munged wants every folder above its socket searchable.
chmod 711 "$WORK"
mkdir -p "$WORK"/{munge,state,spool,log,jobs,shared/bin}
export SLURM_CONF=$WORK/slurm.conf
MUNGE_SOCKET=$WORK/munge/munge.socket.2
PIDS=()
FAILED=0

dump_logs() {
    local f
    for f in "$WORK"/log/* "$WORK"/jobs/*.out; do
        [[ -f $f ]] || continue
        echo "----- $f (last 60 lines)"
        tail -60 "$f"
    done
    echo "-----"
}

cleanup() {
    local rc=$?
    set +e
    if [[ -n ${JOBS_SUBMITTED:-} ]]; then
        scancel $JOBS_SUBMITTED 2>/dev/null
        for _ in $(seq 75); do
            if [[ -z $(squeue -h -o %i 2>/dev/null) ]]; then break; fi
            sleep 0.2
        done
    fi
    if ((rc != 0)) && [[ $rc -ne $EXIT_USAGE ]]; then
        dump_logs >&2
    fi
    # Daemons in reverse order of starting: slurmd, slurmctld, munged.
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill "${PIDS[i]}" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null
    done
    if [[ ${SLURM_CHECK_KEEP:-0} == 1 ]]; then
        echo "slurm_check: kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
CTLD_PORT=16817
while ! port_free "$CTLD_PORT" || ! port_free $((CTLD_PORT + 1)); do
    CTLD_PORT=$((CTLD_PORT + 2))
    ((CTLD_PORT < 17817)) || no_slurm "no two free ports from 16817"
done
SLURMD_PORT=$((CTLD_PORT + 1))

# munge: a fresh key, its own socket (the cluster reaches it through AuthInfo).
dd if=/dev/urandom of="$WORK/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$WORK/munge/munge.key"
munged --foreground --force --key-file="$WORK/munge/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$WORK/munge/munged.pid" --seed-file="$WORK/munge/munged.seed" \
    --log-file="$WORK/log/munged.log" >"$WORK/log/munged.stderr" 2>&1 &
PIDS+=($!)

NODE=$(hostname -s)
# CPUs, sockets, cores, threads and memory as slurmd sees them (without a NodeName= of its own).
HARDWARE=$(slurmd -C | sed -n '1s/^NodeName=[^ ]* //p')
[[ $HARDWARE == CPUs=* ]] || no_slurm "slurmd -C says '$HARDWARE'"
cat >"$SLURM_CONF" <<EOF
ClusterName=runnercheck
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: track processes by their parents, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=10
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 $HARDWARE State=UNKNOWN
PartitionName=check Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

for _ in $(seq 50); do
    [[ -S $MUNGE_SOCKET ]] && break
    sleep 0.1
done
[[ -S $MUNGE_SOCKET ]] || no_slurm "munged did not start ($(cat "$WORK/log/munged.log" 2>/dev/null))"

slurmctld -D -i -f "$SLURM_CONF" >"$WORK/log/slurmctld.stderr" 2>&1 &
PIDS+=($!)
slurmd -D -f "$SLURM_CONF" -N "$NODE" >"$WORK/log/slurmd.stderr" 2>&1 &
PIDS+=($!)

deadline=$((SECONDS + 60))
state=
until [[ $state == idle ]]; do
    ((SECONDS < deadline)) || no_slurm "node $NODE is '$state', not idle, after 60 s"
    for pid in "${PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null || no_slurm "a Slurm daemon exited at start"
    done
    sleep 0.5
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
done
say "cluster up: node $NODE ($HARDWARE), slurmctld on 127.0.0.1:$CTLD_PORT"

# ---------------------------------------------------------------------------------------------
# The README's job script, verbatim: the sh block after "A Slurm job array:". Its shared folder
# ($SHARED, exported to the job by sbatch) holds what a cluster's shared storage would.

awk '/A Slurm job array:/ { found = 1; next }
     found && /^```sh$/ { inside = 1; next }
     inside && /^```$/ { exit }
     inside { print }' "$README" >"$WORK/jobs/sweep.sh"
[[ -s $WORK/jobs/sweep.sh ]] || { say "no sh block after 'A Slurm job array:' in $README"; exit "$EXIT_FAIL"; }
say "job script (from README.md):"
sed 's/^/    /' "$WORK/jobs/sweep.sh"

export SHARED=$WORK/shared
ln -s "$RUNNER" "$SHARED/bin/runner"
ln -s "$EXPERIMENTS" "$SHARED/experiments"
mkdir -p "$RESULTS"
ln -s "$RESULTS" "$SHARED/results"
JOB_NAME=$(sed -n 's/^#SBATCH --job-name=//p' "$WORK/jobs/sweep.sh")
[[ -n $JOB_NAME ]] || JOB_NAME=sweep.sh
OUTPUT=$(sed -n 's/^#SBATCH --output=//p' "$WORK/jobs/sweep.sh")
[[ -n $OUTPUT ]] || OUTPUT=slurm-%A_%a.out
[[ $OUTPUT != /* ]] || { say "the job script's --output is not in the submit folder: $OUTPUT"; exit "$EXIT_FAIL"; }

# ---------------------------------------------------------------------------------------------
# Helpers.

fail() {
    say "FAILED: $*" >&2
    FAILED=1
}

# Submits the array as the README says (`SHARED=... sbatch --array=0-(n-1) sweep.sh`); sets JOB.
submit() {
    # The folder sbatch is called from is the job's working folder (its outputs land there).
    # One CPU a task: the script asks for more than this machine may have.
    JOB=$(cd "$WORK/jobs" && sbatch --parsable --array="0-$((TASKS - 1))" --cpus-per-task=1 sweep.sh)
    JOB=${JOB%%;*}
    JOBS_SUBMITTED="${JOBS_SUBMITTED:-} $JOB"
}

job_pending_or_running() { [[ -n $(squeue -h -j "$1" -o %i 2>/dev/null) ]]; }

wait_job() {
    local job=$1 deadline=$((SECONDS + TIMEOUT))
    while job_pending_or_running "$job"; do
        if ((SECONDS >= deadline)); then
            say "job $job still in the queue after ${TIMEOUT}s" >&2
            squeue >&2
            exit "$EXIT_FAIL"
        fi
        sleep 0.5
    done
}

# "TASK STATE EXIT" per array task of a job, from slurmctld's memory (no accounting here).
task_states() {
    scontrol -o show job "$1" |
        sed -n 's/.*ArrayTaskId=\([0-9]*\) .*JobState=\([A-Z_]*\) .*ExitCode=\([0-9:]*\) .*/\1 \2 \3/p' |
        sort -n
}

# The output file of task $2 of job $1, after the script's --output pattern.
out_of() {
    local name=${OUTPUT//%x/$JOB_NAME}
    name=${name//%A/$1}
    echo "$WORK/jobs/${name//%a/$2}"
}

# The config hashes (8 digits) a task's sweep started: its "[k/m] NAME POINT (config HASH)" lines.
started_hashes() { sed -n 's/^\[[0-9]*\/[0-9]*\] .* (config \([0-9a-f]*\))$/\1/p' "$1"; }

# Every run of the results folder as "run_id,status,experiment,sweep_point" lines (the point last:
# it may hold commas and quotes, the other columns cannot).
runs_csv() {
    "$RUNNER" results "$RESULTS" --columns run_id,status,experiment,sweep_point --format csv |
        tail -n +2 | sort
}

hash_of_run() { echo "${1##*-}"; }

# ---------------------------------------------------------------------------------------------
# 1. The array; one task is killed while it trains.

shopt -s nullglob
files=("$EXPERIMENTS"/*.toml)
shopt -u nullglob
((${#files[@]})) || { say "no *.toml in $EXPERIMENTS"; exit "$EXIT_FAIL"; }
check_out=$("$RUNNER" check "${files[@]}") || { say "runner check ${files[*]} failed"; exit "$EXIT_FAIL"; }
points=$(sed -n 's/.*grid of \([0-9]*\) points.*/\1/p; s/.*: ok ([0-9]* classes.*/1/p' <<<"$check_out" |
    awk '{ n += $1 } END { print n + 0 }')
((points >= TASKS)) || { say "want at least $TASKS points in $EXPERIMENTS, found $points"; exit "$EXIT_FAIL"; }
say "$points points over $TASKS array tasks"

submit
job1=$JOB
say "submitted array job $job1"
victim=
victim_run=
deadline=$((SECONDS + TIMEOUT))
# The first run seen with a checkpoint but not yet its model: kill the array task running it.
while [[ -z $victim ]] && job_pending_or_running "$job1"; do
    ((SECONDS < deadline)) || { say "no run reached a checkpoint in ${TIMEOUT}s"; exit "$EXIT_FAIL"; }
    for ckpt in "$RESULTS"/*/last.ckpt; do
        [[ -f $ckpt ]] || continue
        run=$(basename "$(dirname "$ckpt")")
        if [[ -f $RESULTS/$run/model.json ]]; then continue; fi
        hash=$(hash_of_run "$run")
        for ((t = 0; t < TASKS; t++)); do
            f=$(out_of "$job1" "$t")
            if [[ -f $f ]] && started_hashes "$f" | grep -qx "${hash:0:8}"; then
                victim=$t
                victim_run=$run
                break 2
            fi
        done
    done
    sleep 0.1
done
[[ -n $victim ]] || { say "the array ended before any run could be killed (make the runs longer)"; exit "$EXIT_FAIL"; }
scancel "${job1}_$victim"
say "killed array task ${job1}_$victim (scancel) while it trained $victim_run"
wait_job "$job1"

say "array job $job1, per task (id, state, exit):"
task_states "$job1" | sed 's/^/    /'
while read -r t state _; do
    if [[ $t == "$victim" ]]; then
        [[ $state == CANCELLED ]] || fail "task $t, killed, ended $state"
    else
        [[ $state == COMPLETED ]] || fail "task $t ended $state"
    fi
done < <(task_states "$job1")
[[ $(task_states "$job1" | wc -l) -eq $TASKS ]] || fail "not $TASKS tasks in job $job1"

# Each point was started by one task only, and by the task of its shard: shard t's output lists
# points t, t+n, ... in order, and the kill stopped task $victim after the run it killed.
declare -A started_by=()
for ((t = 0; t < TASKS; t++)); do
    f=$(out_of "$job1" "$t")
    [[ -f $f ]] || { fail "no output $f"; continue; }
    shard_line=$(grep -m1 '^sweep: ' "$f" || true)
    [[ $shard_line == *"$points runs, shard $t/$TASKS:"* ]] || fail "task $t: '$shard_line' is not shard $t/$TASKS of $points runs"
    while read -r h; do
        if [[ -n ${started_by[$h]:-} ]]; then
            fail "point (config $h) started by tasks ${started_by[$h]} and $t"
        fi
        started_by[$h]="${started_by[$h]:-}$t"
    done < <(started_hashes "$f")
done
expected_started=0
for ((t = 0; t < TASKS; t++)); do
    in_shard=$(((points - t + TASKS - 1) / TASKS))
    if [[ $t == "$victim" ]]; then
        n=$(started_hashes "$(out_of "$job1" "$t")" | wc -l)
        last=$(started_hashes "$(out_of "$job1" "$t")" | tail -1)
        [[ $last == "$(hash_of_run "$victim_run" | cut -c1-8)" ]] ||
            fail "the killed task went on after $victim_run to config $last"
        expected_started=$((expected_started + n))
    else
        expected_started=$((expected_started + in_shard))
    fi
done
((${#started_by[@]} == expected_started)) ||
    fail "${#started_by[@]} points started, $expected_started expected"

after1=$(runs_csv)
say "runs after the first array:"
sed 's/^/    /' <<<"$after1"
victim_status=$(awk -F, -v r="$victim_run" '$1 == r { print $2 }' <<<"$after1")
victim_point=$(grep "^$victim_run," <<<"$after1" | cut -d, -f3-)
case $victim_status in
    interrupted | stopped) say "killed run $victim_run is $victim_status" ;;
    *) fail "killed run $victim_run is '$victim_status', not interrupted or stopped" ;;
esac
[[ -f $RESULTS/$victim_run/last.ckpt ]] || fail "killed run $victim_run has no checkpoint"
others=$(awk -F, -v r="$victim_run" '$1 != r { print $2 }' <<<"$after1" | sort -u | tr '\n' ' ')
[[ -z $others || $others == "completed " ]] || fail "other runs: $others (want completed)"
[[ $(wc -l <<<"$after1") -eq $expected_started ]] || fail "$(wc -l <<<"$after1") runs, $expected_started started"
# The completed runs' tables, to show they are not touched again.
declare -A table_sum=()
while IFS=, read -r run status _; do
    if [[ $status == completed ]]; then
        table_sum[$run]=$(sha256sum <"$RESULTS/$run.parquet")
    fi
done <<<"$after1"

# ---------------------------------------------------------------------------------------------
# 2. The same array again.

submit
job2=$JOB
say "resubmitted the array: job $job2"
wait_job "$job2"
say "array job $job2, per task (id, state, exit):"
task_states "$job2" | sed 's/^/    /'
while read -r t state _; do
    [[ $state == COMPLETED ]] || fail "task $t of the resubmitted array ended $state"
done < <(task_states "$job2")

resumed=0 skipped=0 fresh=0
for ((t = 0; t < TASKS; t++)); do
    f=$(out_of "$job2" "$t")
    [[ -f $f ]] || { fail "no output $f"; continue; }
    s=$(grep -c '^  skipped: already completed as ' "$f" || true)
    r=$(grep -c '^  resuming .* from its checkpoint' "$f" || true)
    skipped=$((skipped + s))
    resumed=$((resumed + r))
    if [[ $t == "$victim" ]]; then
        grep -q "^  resuming $victim_run from its checkpoint" "$f" ||
            fail "task $t did not resume $victim_run"
    fi
    if grep -q '^  skipped: running in another process' "$f"; then
        fail "task $t found a point locked by another task"
    fi
done
completed1=${#table_sum[@]}
fresh=$((points - completed1 - 1))
say "resubmitted array: $skipped skipped, $resumed resumed, $fresh never started before"
((skipped == completed1)) || fail "$skipped points skipped, $completed1 had completed"
((resumed == 1)) || fail "$resumed runs resumed, want 1"
for run in "${!table_sum[@]}"; do
    [[ $(sha256sum <"$RESULTS/$run.parquet") == "${table_sum[$run]}" ]] ||
        fail "completed run $run was written again"
done
grep -q '"message":"Run resumed."' "$RESULTS/$victim_run.log.jsonl" ||
    fail "the log of $victim_run shows no 'Run resumed.'"

# ---------------------------------------------------------------------------------------------
# 3. runner results over the shared folder.

final=$(runs_csv)
say "runner results $RESULTS:"
"$RUNNER" results "$RESULTS" --columns run_id,status,sweep_point,epochs,best_val_acc | sed 's/^/    /'
[[ $(wc -l <<<"$final") -eq $points ]] || fail "$(wc -l <<<"$final") runs for $points points"
dups=$(cut -d, -f3- <<<"$final" | sort | uniq -d)
[[ -z $dups ]] || fail "points with more than one run: $dups"
distinct=$(cut -d, -f3- <<<"$final" | sort -u | wc -l)
((distinct == points)) || fail "$distinct distinct (experiment, sweep_point) in the results, $points points"
now_point=$(grep "^$victim_run," <<<"$final" | cut -d, -f3-)
[[ $now_point == "$victim_point" ]] ||
    fail "the resumed run $victim_run shows the point '$now_point', before its resume '$victim_point'"
not_done=$(awk -F, '$2 != "completed"' <<<"$final")
[[ -z $not_done ]] || fail "runs not completed: $not_done"
grep -q "^$victim_run,completed," <<<"$final" || fail "$victim_run did not complete under its id"

if ((FAILED)); then
    exit "$EXIT_FAIL"
fi
say "ok: $points points, each run once by its shard's task; the killed task's run ($victim_status) was resumed under its id by the resubmitted array, which skipped the $completed1 completed points"
