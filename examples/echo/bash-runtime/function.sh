# Handlers for the bash runtime: each gets the event (JSON text) as $1 and prints the response.

handler() {
  # Echo: the event is already JSON, so it is a valid response as it is.
  echo "echo handler got: $1" 1>&2
  printf '%s' "$1"
}

fail() {
  echo "failing on purpose" 1>&2
  return 3
}

whereami() {
  # Where the runtime was started: the daemon runs /var/task/bootstrap with cwd /var/task.
  printf '{"cwd":"%s","task_root":"%s","handler":"%s"}' "$(pwd)" "${LAMBDA_TASK_ROOT:-}" "${_HANDLER:-}"
}
