"""Runs ON the instance (uploaded as ``<root>/nko_remote.py``; standard library only).

    hash [--missing-ok] DIR   JSON list of {name, size, sha256} for EVERY file under DIR (hidden
                              files, dot-directories, *.tmp / *.part included); the
                              hash covers exactly ``size`` bytes (logs keep growing), and
                              checkpoints (*.pt) are hashed first, so logs are captured after
                              the checkpoint that records their offsets. A missing DIR, a file
                              that cannot be read, or one replaced or rewritten while hashed
                              (after a few tries) is an error (exit 3): the listing is used to
                              decide that an instance holds nothing left to lose. So is a name
                              that is not UTF-8 (it cannot be named to the syncer), a symbolic
                              link to a directory, or anything not a regular file. A file deleted
                              before it is hashed is left out (nothing of it is left to lose).
                              --missing-ok: a missing DIR lists as []
    verify MANIFEST           check {"root", "files": [{path, sha256, size}]}; prints
                              {"ok", "problems": [{path, why}]}, exit 1 when not ok
    unpack WHEEL DEST         extract a wheel (a zip) into DEST atomically
    runner CTL HB -- ARGV...  run ARGV (the trainer), heartbeat into CTL/heartbeat.json every
                              HB seconds, write CTL/exit.json when it ends; started detached
                              (nohup setsid) so it survives the SSH session
    status CTL                {runner/trainer pids and liveness, heartbeat, exit}
    activity CTLROOT          {run id: {"beat": last heartbeat time, "alive": whether that
                              heartbeat says the trainer runs, "started", "exit": runner start
                              and exit times}} for every runner under CTLROOT
    stop CTL                  SIGTERM the trainer (it keeps last.pt)
    quiesce CTLROOT WAIT_S    stop every trainer under CTLROOT and confirm it exited: SIGTERM,
                              up to WAIT_S seconds for it (and its runner) to exit, then
                              SIGKILL; prints {run id: {"was_running", "exited", "rc"}}; exit 3
                              when one cannot be confirmed gone. Run before the final sync of
                              an instance about to be destroyed: no file changes after it.
    lease CTLROOT UNTIL       write CTLROOT/lease.json {"until": UNTIL} (unix time): the
                              controller's promise to look again before then

Server-side backstop (runner --lease-grace G): every heartbeat the runner reads
CTLROOT/lease.json; once ``until`` is more than G seconds in the past (no controller has
looked at this instance for that long: executor gone, detached, crashed) it stops its
trainer (SIGTERM, then SIGKILL) and records ``{"reason": "lease-expired"}`` in exit.json; if
the instance carries its own Vast API key (CONTAINER_ID and CONTAINER_API_KEY, with
VAST_SERVER_URL) it then asks Vast to stop the instance itself, so compute stops billing.
"""

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile

CHUNK = 1 << 20


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Shrank(IOError):
    pass


def _sha256(path, size, opened=None):
    """sha256 of the first ``size`` bytes; ``opened``: a list that receives the os.stat of
    the file actually read (its inode)."""
    h = hashlib.sha256()
    left = size
    with open(path, "rb") as f:
        if opened is not None:
            opened.append(os.fstat(f.fileno()))
        while left > 0:
            b = f.read(min(CHUNK, left))
            if not b:
                raise Shrank("%s shrank while hashing" % path)
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def _shown(path):
    """A path as text even when its name is not UTF-8 (undecodable bytes as \\xNN)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _nameable(name):
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class HashError(Exception):
    pass


def _hash_stable(path, tries=3):
    """(size, sha256) of a regular file read through the inode its name points to before and
    after the hash, which neither shrank nor was rewritten in place meanwhile (appending is
    fine: the hash covers ``size`` bytes); None when the file was deleted; HashError when it
    cannot be read or keeps changing."""
    for _ in range(tries):
        opened = []
        try:
            before = os.stat(path)
            if not stat.S_ISREG(before.st_mode):
                raise HashError("%s: not a regular file" % path)
            digest = _sha256(path, before.st_size, opened)
            after = os.stat(path)
        except FileNotFoundError:
            if not os.path.lexists(path):
                return None
            if os.path.islink(path) and not os.path.exists(path):
                raise HashError("%s: a dangling symbolic link" % path)
            continue  # replaced (renamed over) between two looks: hash the new file
        except Shrank:
            continue
        except OSError as e:
            raise HashError("%s: cannot read it: %s" % (path, e.strerror or e))
        inodes = {(x.st_dev, x.st_ino) for x in (before, opened[0], after)}
        rewritten = after.st_size == before.st_size and after.st_mtime_ns != before.st_mtime_ns
        if len(inodes) == 1 and after.st_size >= before.st_size and not rewritten:
            return before.st_size, digest
    raise HashError("%s: kept changing while it was hashed (%d tries)" % (path, tries))


def cmd_hash(root, missing_ok=False):
    if not os.path.isdir(root):
        if missing_ok and not os.path.lexists(root):
            print("[]")
            return 0
        print("hash: %s is not a directory (missing runs directory?)" % root, file=sys.stderr)
        return 3
    errors = []

    def walk_error(e):
        errors.append("%s: cannot list it: %s" % (_shown(e.filename or root), e.strerror or e))

    names = []
    for d, dirs, files in os.walk(root, onerror=walk_error):
        for x in list(dirs):
            if os.path.islink(os.path.join(d, x)):  # os.walk would not go in: its files would be left out
                dirs.remove(x)
                errors.append("%s: a symbolic link to a directory, not a regular file" % _shown(os.path.join(d, x)))
        dirs.sort()
        for f in files:
            n = os.path.relpath(os.path.join(d, f), root)
            if not _nameable(n):
                errors.append("%s: its name is not UTF-8, so it cannot be synced by name; rename it"
                              % _shown(os.path.join(d, f)))
                continue
            names.append(n)
    names.sort(key=lambda n: (not n.endswith(".pt"), n))
    out = []
    for n in names:
        try:
            got = _hash_stable(os.path.join(root, n))
        except HashError as e:
            errors.append(_shown(str(e)))
            continue
        if got is not None:
            out.append({"name": n.replace(os.sep, "/"), "size": got[0], "sha256": got[1]})
    if errors:
        more = " (and %d more)" % (len(errors) - 20) if len(errors) > 20 else ""
        print("hash: " + "; ".join(errors[:20]) + more, file=sys.stderr)
        return 3
    print(json.dumps(out))
    return 0


def cmd_verify(manifest_path):
    m = _read_json(manifest_path) or {}
    problems = []
    for f in m.get("files", []):
        p = os.path.join(m["root"], f["path"])
        try:
            size = os.stat(p).st_size
        except OSError:
            problems.append({"path": f["path"], "why": "missing"})
            continue
        if size != f["size"]:
            problems.append({"path": f["path"], "why": "size %d, expected %d" % (size, f["size"])})
        elif _sha256(p, size) != f["sha256"]:
            problems.append({"path": f["path"], "why": "sha256 differs"})
    print(json.dumps({"ok": not problems, "problems": problems}))
    return 0 if not problems else 1


def cmd_unpack(wheel, dest):
    if os.path.isdir(dest):
        return 0
    tmp = "%s.tmp-%d" % (dest, os.getpid())
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp)
    try:
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(dest):
            raise
    return 0


def _alive(pid):
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def _gpu_util():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        values = [float(x) for x in out.split()]
        return sum(values) / len(values) if values else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _lease_until(ctl):
    lease = _read_json(os.path.join(os.path.dirname(ctl.rstrip("/")), "lease.json")) or {}
    try:
        return float(lease["until"])
    except (KeyError, TypeError, ValueError):
        return None


def _stop_proc(proc, wait_s=30.0):
    """SIGTERM ``proc``, SIGKILL it after ``wait_s``; returns its exit status."""
    try:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _stop_this_instance():
    """Ask Vast to stop the instance this runs on, with the instance's own API key (Vast puts
    CONTAINER_ID and CONTAINER_API_KEY in every instance's environment). Returns what
    happened, for exit.json."""
    env = dict(os.environ)
    if not env.get("CONTAINER_API_KEY"):  # an SSH session may not carry the container's environment
        try:
            with open("/proc/1/environ", "rb") as f:
                for item in f.read().split(b"\0"):
                    k, _, v = item.decode("utf-8", "replace").partition("=")
                    if k in ("CONTAINER_ID", "CONTAINER_API_KEY") and v and not env.get(k):
                        env[k] = v
        except OSError:
            pass
    iid, key = env.get("CONTAINER_ID"), env.get("CONTAINER_API_KEY")
    url = env.get("VAST_SERVER_URL") or "https://console.vast.ai"
    if not iid or not key:
        return "no CONTAINER_ID / CONTAINER_API_KEY: instance left running (trainer stopped)"
    import urllib.request

    req = urllib.request.Request("%s/api/v0/instances/%s/" % (url.rstrip("/"), iid), method="PUT",
                                 data=json.dumps({"state": "stopped"}).encode(),
                                 headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return "instance stop requested: HTTP %d" % r.status
    except Exception as e:  # any failure is only reported: the trainer is stopped already
        return "instance stop failed: %s" % (getattr(e, "code", None) or type(e).__name__)


def cmd_runner(ctl, hb, argv, lease_grace=None):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.makedirs(ctl, exist_ok=True)
    for name in ("exit.json", "heartbeat.json"):
        if os.path.exists(os.path.join(ctl, name)):
            os.remove(os.path.join(ctl, name))
    with open(os.path.join(ctl, "trainer.out"), "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    _write_json(os.path.join(ctl, "runner.json"), {"runner_pid": os.getpid(), "trainer_pid": proc.pid,
                                                   "argv": argv, "started": time.time()})

    def forward(sig, frame):
        proc.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    extra = {}
    while True:
        try:
            rc = proc.wait(timeout=hb)
            break
        except subprocess.TimeoutExpired:
            _write_json(os.path.join(ctl, "heartbeat.json"),
                        {"time": time.time(), "trainer_alive": True, "gpu_util": _gpu_util()})
        until = _lease_until(ctl) if lease_grace is not None else None
        if until is not None and time.time() > until + lease_grace:
            rc = _stop_proc(proc)
            extra = {"reason": "lease-expired", "lease_until": until}
            break
    _write_json(os.path.join(ctl, "exit.json"), dict({"rc": rc, "time": time.time()}, **extra))
    if extra:
        extra["instance"] = _stop_this_instance()
        _write_json(os.path.join(ctl, "exit.json"), dict({"rc": rc, "time": time.time()}, **extra))
    _write_json(os.path.join(ctl, "heartbeat.json"), {"time": time.time(), "trainer_alive": False,
                                                      "gpu_util": None})
    return 0


def cmd_status(ctl):
    runner = _read_json(os.path.join(ctl, "runner.json")) or {}
    beat = _read_json(os.path.join(ctl, "heartbeat.json"))
    print(json.dumps({"now": time.time(), "started": runner.get("started"),
                      "runner_pid": runner.get("runner_pid"), "runner_alive": _alive(runner.get("runner_pid")),
                      "trainer_pid": runner.get("trainer_pid"), "trainer_alive": _alive(runner.get("trainer_pid")),
                      "heartbeat": beat, "exit": _read_json(os.path.join(ctl, "exit.json"))}))
    return 0


def cmd_activity(root):
    out = {}
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            ctl = os.path.join(root, name)
            beat = _read_json(os.path.join(ctl, "heartbeat.json")) or {}
            runner = _read_json(os.path.join(ctl, "runner.json")) or {}
            done = _read_json(os.path.join(ctl, "exit.json")) or {}
            out[name] = {"beat": beat.get("time"), "alive": bool(beat.get("trainer_alive")),
                         "started": runner.get("started"), "exit": done.get("time")}
    print(json.dumps(out))
    return 0


def cmd_stop(ctl):
    runner = _read_json(os.path.join(ctl, "runner.json")) or {}
    pid = runner.get("trainer_pid")
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
    return 0


def cmd_quiesce(root, wait_s):
    out, ok = {}, True
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    for name in names:
        ctl = os.path.join(root, name)
        runner = _read_json(os.path.join(ctl, "runner.json")) or {}
        tpid, rpid = runner.get("trainer_pid"), runner.get("runner_pid")
        was = _alive(tpid)
        if was:
            try:
                os.kill(tpid, signal.SIGTERM)
            except OSError:
                pass
        out[name] = {"was_running": was, "exited": False, "rc": None}
    deadline = time.time() + wait_s
    for name in names:
        ctl = os.path.join(root, name)
        runner = _read_json(os.path.join(ctl, "runner.json")) or {}
        tpid, rpid = runner.get("trainer_pid"), runner.get("runner_pid")
        while (_alive(tpid) or _alive(rpid)) and time.time() < deadline:
            time.sleep(0.05)
        if _alive(tpid):
            try:
                os.kill(tpid, signal.SIGKILL)
            except OSError:
                pass
            end = time.time() + 10
            while (_alive(tpid) or _alive(rpid)) and time.time() < end:
                time.sleep(0.05)
        gone = not _alive(tpid)
        ok = ok and gone
        out[name]["exited"] = gone
        out[name]["rc"] = (_read_json(os.path.join(ctl, "exit.json")) or {}).get("rc")
    print(json.dumps(out))
    return 0 if ok else 3


def cmd_lease(root, until):
    os.makedirs(root, exist_ok=True)
    _write_json(os.path.join(root, "lease.json"), {"until": float(until), "written": time.time()})
    return 0


def main(argv):
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "hash":
        return cmd_hash(args[-1], missing_ok="--missing-ok" in args[:-1])
    if cmd == "verify":
        return cmd_verify(args[0])
    if cmd == "unpack":
        return cmd_unpack(args[0], args[1])
    if cmd == "runner":
        sep = args.index("--")
        opts = args[2:sep]
        grace = float(opts[opts.index("--lease-grace") + 1]) if "--lease-grace" in opts else None
        return cmd_runner(args[0], float(args[1]), args[sep + 1:], grace)
    if cmd == "quiesce":
        return cmd_quiesce(args[0], float(args[1]))
    if cmd == "lease":
        return cmd_lease(args[0], args[1])
    if cmd == "status":
        return cmd_status(args[0])
    if cmd == "activity":
        return cmd_activity(args[0])
    if cmd == "stop":
        return cmd_stop(args[0])
    print("unknown command %r" % cmd, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
