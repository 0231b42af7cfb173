"""The stderr filter of multi-process runs: a program of its own, started by
:func:`vicreg_jax.distributed.install_error_filter` as ``python -I -u <this file> START_HINT`` with the job's
stderr as its stdin and the job's original stderr as its stdout.

It passes every line through, except the distributed runtime's reports of a lost peer or coordinator: error
lines of its coordination service (multi-line statuses, held back until it is clear they do not precede a fatal
error), then a fatal line and a C++ stack trace, after which the runtime aborts the process. Those become one
line, ``error: distributed run stopped: ...``. Being its own process, it still writes that line after the job has
been aborted. A line of the job's starting ``error: `` supersedes the held reports.

Standard library only: it runs isolated (``-I``) by file path, without the package on ``sys.path``.
"""

import re
import sys

GLOG = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ (\S+?):\d+\] ')  # a glog line; group 1: its file
RUNTIME = ('coordination_service', 'client.h', 'distributed', 'preemption')  # the runtime's source files


def summary(text: str, coordinator: str, start_hint: str) -> str:
  """The one line for the runtime's fatal report ``text`` (its status, without the stack trace)."""
  if 'RegisterTask' in text or 'register' in text:
    return ('could not start the distributed run (coordinator ' + coordinator + ') within the start-up '
            'timeout: ' + start_hint)
  if 'heartbeat' in text or 'unhealthy' in text:
    ids = re.findall(r'(?m)(?:task:|^\s*)(\d+)\s*$', text)
    who = 'process ' + ', '.join(ids) if ids else 'a process'
    return 'distributed run stopped: ' + who + ' stopped responding (crashed, killed or preempted); see its log'
  if 'leader' in text or 'Failed to send RPC' in text or 'Socket closed' in text:
    return ('distributed run stopped: lost the coordinator (process 0): it crashed, was preempted or cannot be '
            'reached; see its log')
  return 'distributed run stopped: ' + ' '.join(text.split())[:300]


def run(lines, out, start_hint: str) -> None:
  """Copies ``lines`` to ``out`` (flushed line by line), the runtime's lost-peer reports replaced by one line."""
  held, fatal, trace, coordinator = [], None, False, '?'
  for line in lines:
    if fatal is not None:  # the process is being aborted: keep the status, drop the stack trace
      trace = trace or line.startswith('*** Check failure') or line.startswith('    @ ')
      if not trace:
        fatal.append(line)
      continue
    m = GLOG.match(line)
    if 'Connecting to JAX distributed service on ' in line:
      coordinator = line.split(' on ')[-1].strip()
    if m and line[0] in 'EF' and any(r in m.group(1) for r in RUNTIME):
      if line[0] == 'F':
        held, fatal = [], [line[m.end():]]
      else:
        held.append(line)
      continue
    if line.startswith('error: '):
      held = []
    elif held and not m:  # a continuation line of a held report
      held.append(line)
      continue
    out.writelines(held + [line])
    out.flush()
    held = []
  if fatal is not None:
    out.write('error: ' + summary(''.join(fatal), coordinator, start_hint) + '\n')
  out.writelines(held)
  out.flush()


if __name__ == '__main__':
  run(iter(sys.stdin.readline, ''), sys.stdout, sys.argv[1])
