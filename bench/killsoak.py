"""Kill soak, by hand: duplicate emails when workers are SIGKILLed during a busy drain.

    .venv/bin/python bench/killsoak.py --repo . --tag new1 [--n 3000 --kills 40] [--signal term] [--batch 100]

Starts a private redis-server (--redis-port, default 6411), an SMTP sink in a process of its own
(notifier.devmail), app.py, scheduler.py and 2 worker.py on a fresh SQLite file under REPO/var/;
accepts N single sends, then SIGKILLs a random (registered) worker every 0.3-1.0 s and starts a
replacement; waits for every notification to be final plus a few reconciler passes, and prints
counts as one JSON line: duplicates (and whether each was a recovery or a late record), lost,
recovered, recorded late, tracebacks. --repo may be another checkout (its own .venv), so two
versions can be compared in one sitting. Never part of `make test`: it runs for minutes.

    .venv/bin/python bench/killsoak.py --repo . --tag pg1 --database-url postgresql://postgres@127.0.0.1:5432

--database-url postgresql://USER@HOST:PORT[/NAME]: PostgreSQL instead of SQLite. Each run gets a FRESH
database, NAME or else notifier_soak_<tag> (refused if it exists already), created over the URL's server
and user through its `postgres` database, given its schema by `python -m notifier db upgrade`, and
dropped at the end unless --keep-db. --workdir: where the logs (and a SQLite file) go (default REPO/var).

--signal term: a rolling deploy instead of a crash: the worker gets SIGTERM and its replacement starts at
once; the old one must exit by itself (a warm shutdown), and each exit is timed (term_exit_seconds); one
still running TERM_GRACE seconds after its SIGTERM is SIGKILLed and counted (term_not_exited).
--batch K: the N sends are accepted through POST /api/notifications/batch, K items a request, so the
workers drain them in a batch's shared jobs (BATCH_JOB_SIZE to a job) instead of a job per send.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

SINK_CODE = r"""
import sys, time
from notifier import devmail
port, path = int(sys.argv[1]), sys.argv[2]
out = open(path, "a", buffering=1)

class Sink(devmail.CaptureHandler):
    async def handle_DATA(self, server, session, envelope):
        reply = await super().handle_DATA(server, session, envelope)
        if reply.startswith("250"):
            self.messages.clear()  # counted in the file, not kept in memory
            mid = ""
            for line in bytes(envelope.content).split(b"\n"):
                if line.lower().startswith(b"message-id:"):
                    mid = line.split(b":", 1)[1].strip().decode()
                    break
            for rc in envelope.rcpt_tos:
                out.write(f"{time.time():.6f}\t{rc}\t{mid}\n")
        return reply

controller = devmail.Controller(Sink(), hostname="127.0.0.1", port=port)
controller.start()
import threading
threading.Event().wait()
"""

TERM_GRACE = 30.0  # --signal term: seconds a worker has to exit after its SIGTERM before it is SIGKILLed
FINAL = {"sent", "failed", "suppressed", "cancelled", "expired", "digested"}


def fresh_database(url: str, tag: str) -> tuple[tuple[dict, str], str]:
    """A fresh PostgreSQL database for a run, over url's server and user: ((admin dsn kwargs, name), its
    URL). Named by url's path, or else notifier_soak_<tag>; refused if it exists already."""
    import psycopg2
    from psycopg2.extensions import parse_dsn

    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("postgres", "postgresql"):
        raise SystemExit("--database-url: a postgresql:// URL")
    dbname = urllib.parse.unquote(u.path.lstrip("/")) or "notifier_soak_" + re.sub(r"[^a-z0-9_]", "_", tag.lower())
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", dbname) or dbname in ("postgres", "template0", "template1"):
        raise SystemExit(f"--database-url: {dbname!r} is no name for a fresh soak database")
    admin = {"host": "127.0.0.1", "user": "postgres", **parse_dsn(url), "dbname": "postgres"}
    adm = psycopg2.connect(**admin)
    adm.autocommit = True
    with adm.cursor() as cur:
        cur.execute("select 1 from pg_database where datname = %s", (dbname,))
        if cur.fetchone():
            raise SystemExit(f"database {dbname} exists already: a run needs a fresh one")
        cur.execute(f'create database "{dbname}"')
    adm.close()
    netloc = u.netloc or f"{admin['user']}@{admin['host']}"
    return (admin, dbname), urllib.parse.urlunsplit((u.scheme, netloc, "/" + dbname, u.query, ""))


def drop_database(pg: tuple[dict, str]) -> None:
    """Drop a run's database (fresh_database's), whoever is still connected to it."""
    import psycopg2

    adm = psycopg2.connect(**pg[0])
    adm.autocommit = True
    with adm.cursor() as cur:
        cur.execute(f'drop database if exists "{pg[1]}" with (force)')
    adm.close()


class Spawner:
    """The processes a run starts, each writing to LOGDIR/<name>.log; all of them in .procs."""

    def __init__(self, logdir: str, cwd: str):
        self.logdir, self.cwd, self.procs = logdir, cwd, []

    def __call__(self, argv: list[str], name: str, env: dict) -> subprocess.Popen:
        log = open(os.path.join(self.logdir, f"{name}.log"), "ab")  # noqa: SIM115 - the process owns it
        proc = subprocess.Popen(argv, env=env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc


def wait_all_final(statuses, timeout: float, interval: float) -> dict:
    """Poll statuses() (count by status) until every notification is in a FINAL status, or timeout
    seconds have passed; return the last counts."""
    started = time.monotonic()
    while True:
        counts = statuses()
        if all(status in FINAL for status in counts) or time.monotonic() - started > timeout:
            return counts
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--kills", type=int, default=40)
    ap.add_argument("--redis-port", type=int, default=6411)
    ap.add_argument("--settle-timeout", type=float, default=300)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--sink", choices=["proc", "inproc"], default="proc",
                    help="proc: SMTP sink in its own process (no GIL shared with the kill loop); inproc: a thread here")
    ap.add_argument("--database-url", default=None,
                    help="postgresql://user@host:port: a fresh database notifier_soak_<tag> per run; default SQLite")
    ap.add_argument("--keep-db", action="store_true", help="leave the PostgreSQL database after the run")
    ap.add_argument("--workdir", default=None, help="logs and SQLite file here (default REPO/var)")
    ap.add_argument("--signal", choices=["kill", "term"], default="kill",
                    help="kill: SIGKILL the worker; term: SIGTERM it (a rolling deploy) and time its exit")
    ap.add_argument("--batch", type=int, default=0,
                    help="accept the sends through the batch endpoint, this many items a request (0: single sends)")
    args = ap.parse_args()

    def _term(*_):  # `timeout` sends SIGTERM: stop what was started and drop the database on the way out
        raise KeyboardInterrupt("SIGTERM")
    signal.signal(signal.SIGTERM, _term)
    repo = os.path.abspath(args.repo)
    sys.path.insert(0, repo)
    from notifier import devmail  # the checkout's own capture server

    rnd = random.Random(args.seed)
    py = os.path.join(repo, ".venv", "bin", "python")
    workdir = os.path.abspath(args.workdir) if args.workdir else os.path.join(repo, "var")
    logdir = os.path.join(workdir, f"soak-{args.tag}")
    os.makedirs(logdir, exist_ok=True)
    pg = None  # (admin dsn kwargs, database name) on PostgreSQL
    if args.database_url:
        pg, database_url = fresh_database(args.database_url, args.tag)
        dbfile = None
    else:
        dbfile = os.path.join(workdir, f"soak-{args.tag}.db")
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(dbfile + suffix):
                os.remove(dbfile + suffix)
        database_url = f"sqlite:///{dbfile}"

    def connect():  # the run's database, with "?" placeholders either way
        if pg is None:
            return sqlite3.connect(dbfile, timeout=30)
        import psycopg2
        c = psycopg2.connect(**dict(pg[0], dbname=pg[1]))
        c.autocommit = True
        return c

    def query(con, sql, params=()):
        if pg is None:
            return con.execute(sql, params).fetchall()
        with con.cursor() as cur:
            cur.execute(sql.replace("?", "%s"), params)
            return cur.fetchall()
    spawn = Spawner(logdir, repo)
    procs = spawn.procs

    redis_proc = spawn(["redis-server", "--port", str(args.redis_port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--daemonize", "no"], "redis", dict(os.environ))
    from redis import Redis
    from redis.exceptions import RedisError
    r = Redis(port=args.redis_port)
    for _ in range(100):
        try:
            r.ping()
            break
        except RedisError:
            time.sleep(0.1)
    r.flushall()

    sinkfile = os.path.join(logdir, "sink.tsv")
    if args.sink == "inproc":
        handler = devmail.CaptureHandler()
        smtp = devmail.start(handler)
        smtp_port = smtp.port
    else:
        smtp, smtp_port = None, free_port()
        spawn([py, "-c", SINK_CODE, str(smtp_port), sinkfile], "sink", dict(os.environ, PYTHONPATH=repo))
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", smtp_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise SystemExit("SMTP sink did not start (see sink.log)")

    def sink_rows():  # (time, recipient, message-id) per message the sink answered 250
        if args.sink == "inproc":
            return [(0.0, rc, m.message.get("Message-ID")) for m in list(handler.messages) for rc in m.rcpt_tos]
        with open(sinkfile) as fh:
            return [(float(a), b, c) for a, b, c in (ln.rstrip("\n").split("\t") for ln in fh if ln.count("\t") == 2)]

    def sink_count():
        if args.sink == "inproc":
            return sum(len(m.rcpt_tos) for m in list(handler.messages))
        try:
            with open(sinkfile, "rb") as fh:
                return fh.read().count(b"\n")
        except FileNotFoundError:
            return 0
    api_port = free_port()
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url, REDIS_URL=f"redis://127.0.0.1:{args.redis_port}/0",
        SMTP_HOST="127.0.0.1", SMTP_PORT=str(smtp_port), SMTP_SECURITY="none", MAIL_FROM="soak@example.com",
        RETRY_INTERVALS="1,2,2,3,3", RECONCILE_INTERVAL="1", RECONCILE_GRACE_SECONDS="1", SENDING_TIMEOUT="2",
        JOB_TIMEOUT="5", RATE_LIMIT="1000000/second", RECIPIENT_CAP="", PORT=str(api_port),
        SECRET_KEY="soak-secret-key-not-for-production", PYTHONUNBUFFERED="1", LOG_LEVEL="INFO",
    )
    result: dict = {"tag": args.tag, "repo": repo, "database": pg[1] if pg else dbfile, "signal": args.signal,
                    "batch": args.batch}
    try:
        if pg is not None:  # the schema, as the project makes it (every process would also do this at start)
            up = subprocess.run([py, "-m", "notifier", "db", "upgrade"], env=env, cwd=repo, capture_output=True,
                                text=True, timeout=120)
            if up.returncode:
                raise SystemExit(f"db upgrade failed: {up.stdout}{up.stderr}")
            result["db_upgrade"] = (up.stdout.strip() or up.stderr.strip()).splitlines()[-1:]
        key = subprocess.run([py, "-m", "notifier", "keys", "create", f"soak-{args.tag}"], env=env, cwd=repo,
                             capture_output=True, text=True, check=True, timeout=120).stdout.strip().splitlines()[-1]
        spawn([py, "app.py"], "api", env)
        spawn([py, "scheduler.py"], "scheduler", env)
        base = f"http://127.0.0.1:{api_port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/api/health", timeout=1).close()
                break
            except OSError:  # URLError, a refused or reset connection
                time.sleep(0.1)

        # 1. accept N sends (no worker yet: a full backlog to drain)
        codes = collections.Counter()
        ids: dict[str, str] = {}  # recipient -> id

        def item(i):
            to = f"n{i:05d}-{args.tag}@example.com"
            return {"to": to, "subject": f"soak {i}", "text": f"soak body {i}"}

        def post(i):  # [(to, code, id)] for send i, or for batch i (items i*K .. i*K+K-1)
            if args.batch:
                items = [item(j) for j in range(i * args.batch, min(args.n, (i + 1) * args.batch))]
                path, body = "batch", {"notifications": items}
            else:
                items = [item(i)]
                path, body = "send", items[0]
            req = urllib.request.Request(base + f"/api/notifications/{path}", data=json.dumps(body).encode(),
                                         method="POST",
                                         headers={"Content-Type": "application/json", "X-API-Key": key})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    status, reply = resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as e:
                return [(it["to"], e.code, None) for it in items]
            except Exception as e:  # noqa: BLE001
                return [(it["to"], f"exc:{type(e).__name__}", None) for it in items]
            if not args.batch:
                return [(items[0]["to"], status, reply.get("id"))]
            by_index = {r["index"]: r for r in reply.get("results", [])}
            got = [by_index.get(j, {}).get("id") for j in range(len(items))]
            return [(it["to"], status if nid else "item_rejected", nid) for it, nid in zip(items, got, strict=True)]

        t0 = time.monotonic()
        requests = -(-args.n // args.batch) if args.batch else args.n
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            for answers in ex.map(post, range(requests)):
                for to, code, nid in answers:
                    codes[code] += 1
                    if code == 202 and nid:
                        ids[to] = nid
        result["accept_seconds"] = round(time.monotonic() - t0, 1)
        result["post_codes"] = {str(k): v for k, v in codes.items()}
        result["accepted"] = len(ids)

        # 2. drain with 2 workers, SIGKILLing one every 0.3-1.0 s
        host = socket.gethostname()
        workers: list[subprocess.Popen] = []
        wcount = 0

        def start_worker():
            nonlocal wcount
            wcount += 1
            w = spawn([py, "worker.py"], f"worker{wcount}", env)
            w.number = wcount  # its log: worker<number>.log
            workers.append(w)

        def registered(w):
            return w.poll() is None and r.exists(f"rq:worker:notifier-{host}-{w.pid}")

        start_worker()
        start_worker()
        t_drain = time.monotonic()
        kills = 0
        kill_log: list[tuple[float, int]] = []
        kills_while_backlog = 0
        exits: list[tuple[float | None, int | None, int]] = []  # --signal term: (seconds to exit or None, code, n)
        watchers: list[threading.Thread] = []

        def watch(w, sent_at, n):  # --signal term: how long worker n takes to exit by itself
            try:
                code = w.wait(timeout=TERM_GRACE)
                exits.append((time.monotonic() - sent_at, code, n))
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
                exits.append((None, None, n))

        while kills < args.kills:
            time.sleep(rnd.uniform(0.3, 1.0))
            deadline = time.monotonic() + 30
            ready = [w for w in workers if registered(w)]
            while not ready and time.monotonic() < deadline:
                time.sleep(0.05)
                ready = [w for w in workers if registered(w)]
            if not ready:
                break
            victim = rnd.choice(ready)
            backlog = sink_count() < len(ids)
            kill_log.append((time.time(), victim.pid))
            if args.signal == "term":  # a rolling deploy: the replacement starts at once, the old one winds down
                victim.send_signal(signal.SIGTERM)
                watchers.append(threading.Thread(target=watch, args=(victim, time.monotonic(), victim.number),
                                                 daemon=True))
                watchers[-1].start()
            else:
                victim.send_signal(signal.SIGKILL)
                victim.wait()
            workers.remove(victim)
            kills += 1
            kills_while_backlog += backlog
            start_worker()
        result["kills"] = kills
        result["kills_while_backlog"] = kills_while_backlog
        result["kill_phase_seconds"] = round(time.monotonic() - t_drain, 1)
        if args.signal == "term":
            for t in watchers:
                t.join()
            took = sorted(s for s, _, _ in exits if s is not None)
            result["term_exit_seconds"] = {
                "n": len(took), "min": round(took[0], 2) if took else None,
                "median": round(took[len(took) // 2], 2) if took else None,
                "p90": round(took[int(len(took) * 0.9)], 2) if took else None,
                "max": round(took[-1], 2) if took else None}
            codes_seen = collections.Counter(c for s, c, _ in exits if s is not None)
            result["term_exit_codes"] = {str(c): n for c, n in codes_seen.items()}
            result["term_not_exited"] = sum(1 for s, _, _ in exits if s is None)
            result["term_slowest"] = {f"worker{n}": round(s, 2) if s is not None else None
                                      for s, _, n in sorted(exits, key=lambda e: -1 if e[0] is None else -e[0])[:3]}
            result["term_killed_by_signal"] = [f"worker{n}" for s, c, n in exits if s is not None and c and c < 0]
        result["received_at_end_of_kills"] = sink_count()

        # 3. settle: every notification final, then a few reconciler passes
        def statuses():
            con = connect()
            try:
                return dict(query(con, "select status, count(*) from notifications group by status"))
            finally:
                con.close()

        t_settle = time.monotonic()
        wait_all_final(statuses, args.settle_timeout, 2)
        result["settle_seconds"] = round(time.monotonic() - t_settle, 1)
        time.sleep(6)  # >= 3 reconciler passes (RECONCILE_INTERVAL=1)
        result["drain_total_seconds"] = round(time.monotonic() - t_drain, 1)

        # 4. count
        con = connect()
        st = dict(query(con, "select status, count(*) from notifications group by status"))
        result["statuses"] = st
        rows = query(con, "select id, seq, \"to\", status from notifications")
        fk = "notification_id"
        if pg is None:
            ev_join = query(con, "select count(*) from notification_events e "
                                 f"join notifications n on n.seq = e.{fk}")[0][0]
            key_col = "seq" if ev_join else "id"
        else:  # the foreign key's type says what it references (joining bigint to varchar is an error here)
            dtype = query(con, "select data_type from information_schema.columns where table_name = "
                               "'notification_events' and column_name = ?", (fk,))[0][0]
            key_col = "seq" if dtype in ("bigint", "integer") else "id"
        like = "like" if pg is None else "ilike"  # SQLite's LIKE ignores ASCII case

        def reasons(pattern):
            return query(con, f"select n.\"to\" from notification_events e join notifications n on n.{key_col} = "
                              f"e.{fk} where e.reason {like} ?", (pattern,))
        late = [t for (t,) in reasons("%recorded late%")]
        recovered = [t for (t,) in reasons("recovered%")]
        con.close()
        received = collections.Counter()
        msgids = collections.Counter()
        first_at: dict[str, float] = {}
        for at, rc, mid in sink_rows():
            received[rc.lower()] += 1
            msgids[mid] += 1
            first_at.setdefault(rc.lower(), at)
        by_to = {t.lower(): s for (_id, _seq, t, s) in rows}
        dups = {t: c for t, c in received.items() if c > 1}
        lost = [t for t, s in by_to.items() if received[t] == 0 and s != "failed"]
        result.update(
            sent=st.get("sent", 0),
            emails_received=sum(received.values()),
            duplicates=len(dups),
            extra_copies=sum(c - 1 for c in dups.values()),
            duplicate_message_ids=sum(1 for c in msgids.values() if c > 1),
            lost=len(lost),
            lost_statuses=dict(collections.Counter(by_to[t] for t in lost)),
            sent_but_never_received=sum(1 for t, s in by_to.items() if s == "sent" and received[t] == 0),
            received_unknown=sum(1 for t in received if t not in by_to),
            recorded_late=len(late),
            recovered=len(recovered),
            dup_of_recovered=sum(1 for t in dups if t in set(recovered)),
            dup_of_recorded_late=sum(1 for t in dups if t in set(late)),
            workers_started=wcount,
        )
        if args.sink == "proc":  # ms from a duplicate's first copy reaching the sink to the next SIGKILL
            result["dup_first_copy_to_next_kill_ms"] = sorted(
                round(min((k - first_at[t] for k, _ in kill_log if k >= first_at[t] - 0.05), default=-1) * 1000, 1)
                for t in dups)
    finally:
        for p in reversed(procs):
            if p is not redis_proc and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            if p is not redis_proc:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        try:
            r.shutdown(nosave=True)
        except Exception:  # noqa: BLE001 - shutdown closes the connection
            pass
        try:
            redis_proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            redis_proc.kill()
            redis_proc.wait()
        if smtp is not None:
            smtp.stop()
        if pg is not None and not args.keep_db:
            try:
                drop_database(pg)
                result["db_dropped"] = True
            except Exception as e:  # noqa: BLE001
                result["db_dropped"] = f"{type(e).__name__}: {e}"
    # log scan
    tb = collections.Counter()
    errors = collections.Counter()
    for name in sorted(os.listdir(logdir)):
        text = open(os.path.join(logdir, name), errors="replace").read()
        tb[name.rstrip("0123456789.log") or name] += text.count("Traceback")
        errors[name.rstrip("0123456789.log") or name] += text.count('"level": "ERROR"')
    result["tracebacks"] = dict(tb)
    result["error_lines"] = dict(errors)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
