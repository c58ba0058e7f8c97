#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by .ci/slurm_up.sh (local use).
# Stops slurmctld, slurmd and munged (by their pid files).  Job state in
# /var/spool/slurmctld is kept: jobs still queued come back with slurm_up.sh.
# Processes of jobs still running are not killed by stopping the daemons;
# run 'scancel --user=root' first if you want them gone.
set -euo pipefail

CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGED_PID=/run/munge/munged.pid

log() { printf '[slurm_down] %s\n' "$*"; }

[[ "$(id -u)" -eq 0 ]] || { echo "[slurm_down] ERROR: must run as root" >&2; exit 1; }

# pid of daemon $2 from pid file $1, or nothing if it is not running
live_pid() {
    local pid
    [[ -s "$1" ]] || return 0
    pid=$(cat "$1")
    if [[ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" == "$2" ]] &&
        [[ "$(ps -o stat= -p "$pid" 2>/dev/null || true)" != Z* ]]; then
        printf '%s\n' "$pid"
    fi
}

stop() { # pidfile name [pid recorded earlier]
    local pid="${3:-}"
    [[ -n "$pid" ]] || pid=$(live_pid "$1" "$2")
    if [[ -z "$pid" ]]; then
        log "$2 not running"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        if [[ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" != "$2" ]] ||
            [[ "$(ps -o stat= -p "$pid" 2>/dev/null || true)" == Z* ]]; then
            log "stopped $2 (pid $pid)"
            return 0
        fi
        sleep 0.1
    done
    log "$2 (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

ctld=$(live_pid "$CTLD_PID" slurmctld)
slurmd=$(live_pid "$SLURMD_PID" slurmd)
# Orderly shutdown of slurmctld and all slurmds (saves state), then make sure.
if [[ -n "$ctld" ]]; then
    scontrol shutdown >/dev/null 2>&1 || true
fi
stop "$SLURMD_PID" slurmd "$slurmd"
stop "$CTLD_PID" slurmctld "$ctld"
stop "$MUNGED_PID" munged
