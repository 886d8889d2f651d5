"""Run untrusted generated code (HumanEval samples) in a separate, locked-down Python process.

What a sample gets, in the order the child sets it up (a trusted runner does this before the first line of the
sample runs; each layer is recorded in `SandboxResult.isolation` so a report can say what was in force):

OS-enforced (hold even against code that defeats the Python-level checks):
- a separate process in its own session, killed with its whole process group (SIGKILL) at the wall-clock limit;
- RLIMIT_CPU (SIGXCPU, then SIGKILL one second later), RLIMIT_AS (address space: huge allocations raise
  MemoryError), RLIMIT_FSIZE (no disk filling), RLIMIT_NOFILE, no core dumps;
- a fresh temporary working directory (also HOME and TMPDIR), removed afterwards;
- an environment built from scratch (PATH, LANG, HOME, TMPDIR only): the caller's variables, tokens and keys
  are never in the child; stdin is /dev/null; Python runs with -I -S -B (stdlib only, no site, no user files);
- where the kernel permits (root, or unprivileged user namespaces): a new network namespace (only a down
  loopback, so connect() fails with "Network is unreachable"), and a new mount namespace in which every mount
  but the temp dir is remounted read-only, so nothing outside the temp dir can be written;
- as root: either the child switches to `nobody` (when the Python stdlib is readable by others; then also
  RLIMIT_NPROC = 0, so fork is refused by the kernel) or it drops every capability and sets no_new_privs
  (so it cannot undo the namespaces or mounts).

Python-level (a second layer; an audit hook cannot be removed, but code that corrupts interpreter memory could
get past it — which is why the layers above exist):
- an audit hook denies open()/listdir outside the temp dir (reads of the stdlib are allowed), file writes,
  renames, removals and mode changes outside the temp dir, os.system, exec*, spawn*, posix_spawn, fork,
  subprocess, kill, socket creation/connect/bind, and importing ctypes / _posixsubprocess;
- `socket.socket` and `socket.create_connection` are replaced by functions that raise.

Not guaranteed: reading world-readable files when the audit hook is bypassed and the child still runs as the
caller's user (e.g. non-root, or root with a stdlib under a private home as on this machine); CPU contention
with the host; a sample that ends with os._exit(0) before its tests run counts as passed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field

NOBODY = 65534

_RUNNER = r'''
import json, os, resource, sys
cfg = json.loads(sys.argv[1]); sys.argv[:] = ["prog.py"]
tmp = cfg["tmp"]; report = {}
def _namespaces():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    NEWNS, NEWUSER, NEWNET = 0x20000, 0x10000000, 0x40000000
    if libc.unshare(NEWNET) == 0:
        report["network"] = "netns"
    elif libc.unshare(NEWUSER | NEWNET) == 0:
        report["network"] = "userns+netns"
    else:
        report["network"] = "audit-hook only"
    report["readonly_fs"] = False
    if libc.unshare(NEWNS) != 0:
        return libc
    MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
    keep = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048,
            "relatime": 1 << 21}
    e = lambda s: s.encode()
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) or libc.mount(e(tmp), e(tmp), None, MS_BIND, None):
        return libc
    with open("/proc/self/mountinfo") as f:
        mounts = [ln.split() for ln in f]
    ok = True
    for m in mounts:
        mp = m[4].replace("\\040", " ")
        if mp == tmp:
            continue
        flags = MS_REMOUNT | MS_BIND | 1
        for opt in m[5].split(","):
            flags |= keep.get(opt, 0)
        if libc.mount(None, e(mp), None, flags, None) != 0:
            ok = False
    report["readonly_fs"] = ok
    os.chdir(tmp)  # the old cwd still points into the (now read-only) parent mount
    return libc
def _drop(libc):
    if os.geteuid() != 0:
        report["user"] = "caller's (non-root)"
        return
    if cfg["drop_uid"]:
        os.setgroups([]); os.setgid(cfg["drop_uid"]); os.setuid(cfg["drop_uid"])
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        report["user"] = "nobody, RLIMIT_NPROC=0"
        return
    import ctypes
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    class Hdr(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    data = (ctypes.c_uint32 * 6)()
    ok = libc.capset(ctypes.byref(Hdr(0x20080522, 0)), data) == 0
    report["user"] = "root without capabilities" if ok else "root (capset failed)"
libc = None
try:
    libc = _namespaces()
except Exception as ex:
    report["namespaces_error"] = repr(ex)
_drop(libc)
MB = 1 << 20
for lim, val in ((resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1)), (resource.RLIMIT_CORE, (0, 0)),
                 (resource.RLIMIT_FSIZE, (cfg["file_mb"] * MB,) * 2), (resource.RLIMIT_NOFILE, (64, 64)),
                 (resource.RLIMIT_AS, (cfg["memory_mb"] * MB,) * 2)):
    resource.setrlimit(lim, val)
import socket
def _no_net(*a, **k):
    raise PermissionError("network access is disabled in the sandbox")
socket.socket = socket.create_connection = socket.socketpair = _no_net
real = os.path.realpath
read_roots = tuple(real(p) for p in [tmp] + [p for p in sys.path if p])
write_roots = (real(tmp),)
def _inside(path, roots):
    if isinstance(path, int):
        return True
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    p = real(os.path.join(os.getcwd(), os.fspath(path)))
    return p in ("/dev/null", "/dev/urandom") or any(p == r or p.startswith(r + os.sep) for r in roots)
DENY = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
        "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "socket.__new__", "socket.connect",
        "socket.bind", "socket.sendto", "socket.getaddrinfo", "os.setuid", "os.setgid"}
PATH_WRITE = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.chmod", "os.chown",
              "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.mkfifo", "os.mknod", "shutil.rmtree",
              "shutil.copyfile", "shutil.move", "os.removexattr", "os.setxattr"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
busy = [False]
def _hook(event, args):
    if busy[0]:
        return
    busy[0] = True
    try:
        if event in DENY or event.startswith("ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].split(".")[0] in ("ctypes", "_ctypes", "_posixsubprocess"):
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = any(c in (mode or "") for c in "wax+") or (mode is None and (flags or 0) & WRITE_FLAGS)
            if not _inside(path, write_roots if writes else read_roots):
                raise PermissionError(f"sandbox: open({path!r}, {mode!r}) outside the sandbox directory")
        elif event in ("os.listdir", "os.scandir", "os.chdir"):
            if args and args[0] is not None and not _inside(args[0], read_roots):
                raise PermissionError(f"sandbox: {event}({args[0]!r}) outside the sandbox directory")
        elif event in PATH_WRITE:
            for a in args:
                if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a, write_roots):
                    raise PermissionError(f"sandbox: {event}({a!r}) outside the sandbox directory")
    finally:
        busy[0] = False
with open(os.path.join(tmp, "prog.py"), encoding="utf-8") as f:
    src = f.read()
sys.addaudithook(_hook)
rep = json.dumps(report).encode()
os.write(cfg["report_fd"], rep); os.close(cfg["report_fd"])
del cfg, report, rep, libc, f
try:
    exec(compile(src, "prog.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except BaseException:
    import traceback
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
sys.stdout.flush()
os._exit(0)
'''


@dataclass
class Limits:
    """Per-sample limits; the defaults suit HumanEval (its tests run in well under a second)."""

    timeout_s: float = 10.0
    cpu_s: int | None = None  # default: the wall-clock timeout, rounded up
    memory_mb: int = 1024
    file_mb: int = 16
    max_output: int = 16_000  # characters of stdout/stderr kept per stream


@dataclass
class SandboxResult:
    status: str  # "passed", "failed", "timeout" (wall clock), "killed" (a signal: CPU limit, ...)
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _readable_by_others(path: str) -> bool:
    """True when uid `nobody` can traverse to `path` (every ancestor o+x) and list it (o+r)."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        st = os.stat(os.sep.join(parts[:i]) or "/")
        if not st.st_mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o004)


_DROP_UID: int | None = None


def _drop_uid() -> int:
    """The uid to switch to (0 = do not switch): `nobody` when root and the stdlib is reachable by it."""
    global _DROP_UID
    if _DROP_UID is None:
        stdlib = [sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")]
        ok = os.geteuid() == 0 and all(_readable_by_others(p) for p in stdlib if p)
        _DROP_UID = NOBODY if ok else 0
    return _DROP_UID


def run_python(code: str, limits: Limits | None = None) -> SandboxResult:
    """Run `code` as a script in the sandbox; passed means it ran to the end (exit 0, no exception)."""
    limits = limits or Limits()
    tmp = os.path.realpath(tempfile.mkdtemp(prefix="tianying-sandbox-"))
    drop = _drop_uid()
    with open(os.path.join(tmp, "prog.py"), "w", encoding="utf-8") as f:
        f.write(code)
    if drop:
        os.chown(tmp, drop, drop)
    cfg = {"tmp": tmp, "cpu_s": int(limits.cpu_s or -(-limits.timeout_s // 1)), "memory_mb": limits.memory_mb,
           "file_mb": limits.file_mb, "drop_uid": drop}
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp}
    r, w = os.pipe()
    cfg["report_fd"] = w
    t0 = time.perf_counter()
    status, rc = "failed", None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", _RUNNER, json.dumps(cfg)], cwd=tmp,
                                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(w,),
                                    start_new_session=True)
        finally:
            os.close(w)
        try:
            rc = proc.wait(timeout=limits.timeout_s)
            status = "passed" if rc == 0 else "failed" if rc > 0 else "killed"
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the sample and anything it managed to start
            except (ProcessLookupError, PermissionError):
                pass
            rc = proc.wait()
        wall = time.perf_counter() - t0
        with os.fdopen(r, "rb") as rf:
            raw = rf.read()
        out.seek(0)
        err.seek(0)
        stdout = out.read(limits.max_output * 4).decode("utf-8", "replace")[: limits.max_output]
        stderr = err.read(limits.max_output * 4).decode("utf-8", "replace")[: limits.max_output]
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        isolation = json.loads(raw) if raw else {}
    except ValueError:
        isolation = {}
    if not isolation:  # the runner died before it finished setting up: never count that as a pass
        status = "failed" if status == "passed" else status
    return SandboxResult(status, rc, stdout, stderr, wall, isolation)
