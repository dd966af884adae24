"""Redis chaos soak, by hand: README's Redis failure modes under a production-shaped load.

    .venv/bin/python bench/redischaos.py --tag pg1 --database-url postgresql://postgres@127.0.0.1:5432
    .venv/bin/python bench/redischaos.py --tag lite1            # SQLite

Starts a private redis-server (--redis-port), an SMTP sink process, a callback receiver process, the API
under gunicorn, scheduler.py and 2 worker.py; sends --n notifications over --load-seconds (half as single
sends, half in batches of 100; 20% with delay_seconds 5-30, 30% with a callback_url to the receiver)
while it kills redis-server (-9, restarted empty after 1-10 s), SIGSTOPs it for 3-8 s, and SIGTERMs a
worker (replaced at once). Then it waits for every notification to be final and every callback owed,
sends a fault-free tail to compare notifier_notifications_sent_total with the database, and prints one
JSON line: answers during outages, lost/duplicate emails and callbacks, delayed sends' lateness,
settle time after the last fault, tracebacks and ERROR lines by kind. Never part of `make test`.
"""

from __future__ import annotations

import argparse
import base64
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
from datetime import UTC, datetime

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from bench.killsoak import SINK_CODE, Spawner, drop_database, fresh_database, wait_all_final  # noqa: E402

RECEIVER_CODE = r"""
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, path = int(sys.argv[1]), sys.argv[2]
out = open(path, "a", buffering=1)

class H(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {}
        out.write(f"{time.time():.6f}\t{self.headers.get('Notifier-Event-Id')}\t{doc.get('id')}\t{doc.get('status')}\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""



def wait_port(port, what, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not start on {port}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", required=True)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--load-seconds", type=float, default=110)
    ap.add_argument("--redis-port", type=int, default=6426)
    ap.add_argument("--port-base", type=int, default=5160, help="API +0, SMTP sink +5, callback receiver +6")
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--settle-timeout", type=float, default=400)
    ap.add_argument("--tail", type=int, default=200, help="fault-free sends at the end, for the metric")
    args = ap.parse_args()

    def _term(*_):
        raise KeyboardInterrupt("SIGTERM")
    signal.signal(signal.SIGTERM, _term)
    repo = os.path.dirname(HERE)
    rnd = random.Random(args.seed)
    py = os.path.join(repo, ".venv", "bin", "python")
    workdir = os.path.abspath(args.workdir) if args.workdir else os.path.join(repo, "var")
    logdir = os.path.join(workdir, f"chaos-{args.tag}")
    os.makedirs(logdir, exist_ok=True)
    for name in os.listdir(logdir):
        os.remove(os.path.join(logdir, name))
    api_port, smtp_port, cb_port = args.port_base, args.port_base + 5, args.port_base + 6

    pg = None
    if args.database_url:
        pg, database_url = fresh_database(args.database_url, args.tag)
        dbfile = None
    else:
        dbfile = os.path.join(logdir, "chaos.db")
        database_url = f"sqlite:///{dbfile}"

    def query(sql, params=()):
        if pg is None:
            con = sqlite3.connect(dbfile, timeout=30)
            try:
                return con.execute(sql, params).fetchall()
            finally:
                con.close()
        import psycopg2
        con = psycopg2.connect(**dict(pg[0], dbname=pg[1]))
        try:
            with con.cursor() as cur:
                cur.execute(sql.replace("?", "%s"), params)
                return cur.fetchall()
        finally:
            con.close()

    spawn = Spawner(logdir, repo)
    procs = spawn.procs

    redis_box = {}
    redis_argv = ["redis-server", "--port", str(args.redis_port), "--bind", "127.0.0.1", "--save", "",
                  "--appendonly", "no", "--daemonize", "no"]

    def start_redis():
        redis_box["p"] = spawn(redis_argv, "redis", dict(os.environ))
        wait_port(args.redis_port, "redis")

    start_redis()
    sinkfile, cbfile = os.path.join(logdir, "sink.tsv"), os.path.join(logdir, "callbacks.tsv")
    spawn([py, "-c", SINK_CODE, str(smtp_port), sinkfile], "sink", dict(os.environ, PYTHONPATH=repo))
    spawn([py, "-c", RECEIVER_CODE, str(cb_port), cbfile], "receiver", dict(os.environ))
    wait_port(smtp_port, "sink")
    wait_port(cb_port, "receiver")
    op_user, op_pass = "ops", "chaos-operator-password"
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url, REDIS_URL=f"redis://127.0.0.1:{args.redis_port}/0",
        SMTP_HOST="127.0.0.1", SMTP_PORT=str(smtp_port), SMTP_SECURITY="none", MAIL_FROM="chaos@example.com",
        RETRY_INTERVALS="2,4,8,15,30", RECONCILE_INTERVAL="3", RECONCILE_GRACE_SECONDS="3", SENDING_TIMEOUT="15",
        JOB_TIMEOUT="15", RATE_LIMIT="1000000/second", RECIPIENT_CAP="", CALLBACK_RETRY_INTERVALS="1,2,5,10,20",
        CALLBACK_DENY_NETWORKS="", SECRET_KEY="chaos-secret-key-not-for-production", PYTHONUNBUFFERED="1",
        LOG_LEVEL="INFO", OPERATOR_USERNAME=op_user, OPERATOR_PASSWORD=op_pass, OPERATOR_AUTH_LIMIT="",
    )
    result: dict = {"tag": args.tag, "database": pg[1] if pg else dbfile, "n": args.n}
    t_origin = time.time()
    faults: list[dict] = []
    try:
        subprocess.run([py, "-m", "notifier", "db", "upgrade"], env=env, cwd=repo, check=True,
                       capture_output=True, timeout=120)
        key = subprocess.run([py, "-m", "notifier", "keys", "create", f"chaos-{args.tag}"], env=env, cwd=repo,
                             capture_output=True, text=True, check=True, timeout=120).stdout.strip().splitlines()[-1]
        spawn([os.path.join(repo, ".venv", "bin", "gunicorn"), "app:create_app()", "-b", f"127.0.0.1:{api_port}",
               "-w", "2"], "api", env)
        spawn([py, "scheduler.py"], "scheduler", env)
        workers: list[subprocess.Popen] = []
        wcount = 0

        def start_worker():
            nonlocal wcount
            wcount += 1
            workers.append(spawn([py, "worker.py"], f"worker{wcount}", env))

        start_worker()
        start_worker()
        base = f"http://127.0.0.1:{api_port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/api/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)

        # the load: items, then request units (single sends and batches of 100), paced over load-seconds
        items = []
        for i in range(args.n):
            it = {"to": f"c{i:05d}-{args.tag}@example.com", "subject": f"chaos {i}", "text": f"chaos body {i}"}
            if rnd.random() < 0.2:
                it["delay_seconds"] = rnd.randint(5, 30)
            if rnd.random() < 0.3:
                it["callback_url"] = f"http://127.0.0.1:{cb_port}/hook"
            items.append(it)
        half = args.n // 2
        units = [[i] for i in range(half)] + [list(range(s, min(args.n, s + 100))) for s in range(half, args.n, 100)]
        rnd.shuffle(units)
        # three of the batches go with the worker SIGTERMs: posted just before, so the SIGTERM lands in a
        # shared job (the rest of it handed back to the queue)
        term_batches = [units.pop(k) for k in sorted((k for k, u in enumerate(units) if len(u) > 1),
                                                     reverse=True)[:3]]
        answers: dict[int, dict] = {}  # item index -> code, id, t0, t1, json
        requests_log: list[dict] = []

        def post(unit):
            if len(unit) == 1:
                path, body = "send", items[unit[0]]
            else:
                path, body = "batch", {"notifications": [items[i] for i in unit]}
            req = urllib.request.Request(base + f"/api/notifications/{path}", data=json.dumps(body).encode(),
                                         method="POST", headers={"Content-Type": "application/json",
                                                                 "X-API-Key": key})
            t0 = time.time()
            code, doc, exc = None, None, None
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    code, raw = resp.status, resp.read()
            except urllib.error.HTTPError as e:
                code, raw = e.code, e.read()
            except Exception as e:  # noqa: BLE001
                raw, exc = b"", f"{type(e).__name__}: {e}"
            t1 = time.time()
            try:
                doc = json.loads(raw) if raw else None
            except ValueError:
                doc = None
            requests_log.append({"path": path, "size": len(unit), "t0": t0, "t1": t1, "code": code, "exc": exc,
                                 "json": doc is not None,
                                 "error": (doc or {}).get("error", {}).get("code") if isinstance(doc, dict) else None})
            if code == 202 and isinstance(doc, dict):
                if path == "send":
                    answers[unit[0]] = {"id": doc.get("id"), "t0": t0}
                else:
                    for r in doc.get("results", []):
                        if r.get("id"):
                            answers[unit[r["index"]]] = {"id": r["id"], "t0": t0}

        # the faults, on their own thread, through the load
        def redis_pid():
            return redis_box["p"].pid

        def fault_plan():
            plan = ["kill", "term", "stop", "kill", "term", "kill", "stop", "term", "kill"]
            slot = args.load_seconds / (len(plan) + 1)
            return [(slot * (k + 1) + rnd.uniform(-slot / 4, slot / 4), what) for k, what in enumerate(plan)]

        def run_faults():
            for at, what in fault_plan():
                time.sleep(max(0.0, t_load + at - time.time()))
                f = {"what": what, "start": time.time()}
                if what == "kill":
                    down = rnd.uniform(1, 10)
                    redis_box["p"].send_signal(signal.SIGKILL)
                    redis_box["p"].wait()
                    time.sleep(down)
                    start_redis()
                    f["down"] = round(down, 1)
                elif what == "stop":
                    held = rnd.uniform(3, 8)
                    os.kill(redis_pid(), signal.SIGSTOP)
                    time.sleep(held)
                    os.kill(redis_pid(), signal.SIGCONT)
                    f["held"] = round(held, 1)
                else:
                    if term_batches:
                        post(term_batches.pop())
                    from redis import Redis
                    from rq import Worker
                    live = [w for w in workers if w.poll() is None]
                    victim, end = None, time.time() + 5
                    while victim is None and time.time() < end:  # one in the middle of a shared job
                        try:
                            busy = {rw.pid for rw in Worker.all(connection=Redis(port=args.redis_port))
                                    if rw.get_state() == "busy" and (rw.get_current_job_id() or "").startswith(
                                        "notifications-")}
                        except Exception:  # noqa: BLE001
                            busy = set()
                        victim = next((w for w in live if w.pid in busy), None)
                        time.sleep(0.02)
                    f["mid_shared_job"] = victim is not None
                    victim = victim or rnd.choice(live)
                    victim.send_signal(signal.SIGTERM)
                    workers.remove(victim)
                    start_worker()
                    f["victim_pid"] = victim.pid
                f["end"] = time.time()
                faults.append(f)

        t_load = time.time()
        fth = threading.Thread(target=run_faults, daemon=True)
        fth.start()
        gap = args.load_seconds / len(units)
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            futs = []
            for k, unit in enumerate(units):
                time.sleep(max(0.0, t_load + k * gap - time.time()))
                futs.append(ex.submit(post, unit))
            for f in futs:
                f.result()
        result["load_seconds"] = round(time.time() - t_load, 1)
        fth.join()
        t_last_fault = max(f["end"] for f in faults)
        result["faults"] = [{k: (round(v - t_load, 1) if k in ("start", "end") else v) for k, v in f.items()}
                            for f in faults]

        # requests: answers overall and during outages
        windows = [(f["start"], f["end"] + 1, f["what"]) for f in faults if f["what"] in ("kill", "stop")]

        def during(rq):
            return next((w for s, e, w in windows if rq["t0"] < e and rq["t1"] > s), None)
        by = collections.Counter()
        worst = collections.defaultdict(float)
        for rq in requests_log:
            w = during(rq) or "calm"
            by[(w, rq["path"], rq["code"] if rq["code"] else rq["exc"], rq["json"])] += 1
            worst[(w, rq["path"])] = max(worst[(w, rq["path"])], rq["t1"] - rq["t0"])
        result["answers"] = {f"{w}/{p}/{c}/json={j}": n for (w, p, c, j), n in sorted(by.items(), key=str)}
        result["worst_latency_s"] = {f"{w}/{p}": round(s, 2) for (w, p), s in sorted(worst.items())}
        slow = sorted(requests_log, key=lambda rq: rq["t0"] - rq["t1"])[:8]
        result["slowest_requests"] = [(rq["path"], round(rq["t0"] - t_load, 2), round(rq["t1"] - rq["t0"], 2),
                                       rq["code"]) for rq in slow]
        hung = sorted(rq["t1"] - rq["t0"] for rq in requests_log if during(rq) == "stop")
        if hung:
            result["latency_during_stop_s"] = {"n": len(hung), "median": round(hung[len(hung) // 2], 2),
                                               "p90": round(hung[int(len(hung) * .9)], 2), "max": round(hung[-1], 2)}
        result["accepted"] = len(answers)

        # settle: every accepted notification final
        ids = {a["id"]: i for i, a in answers.items()}

        def statuses():
            return dict(query("select status, count(*) from notifications group by status"))
        t_settle = time.time()
        st = wait_all_final(statuses, args.settle_timeout, 1)
        t_final = time.time()
        result["final_after_last_fault_s"] = round(t_final - t_last_fault, 1)
        result["final_after_load_s"] = round(t_final - t_settle, 1)
        result["statuses_at_settle"] = st

        # callbacks owed: wait for each (or 60 s)
        owed = {a["id"] for i, a in answers.items() if "callback_url" in items[i]}

        def cb_rows():
            try:
                with open(cbfile) as fh:
                    return [ln.rstrip("\n").split("\t") for ln in fh if ln.count("\t") == 3]
            except FileNotFoundError:
                return []
        end = time.time() + 90
        while time.time() < end:
            got = {r[2] for r in cb_rows()}
            if owed <= got:
                break
            time.sleep(1)
        result["callbacks_done_after_last_fault_s"] = round(time.time() - t_last_fault, 1)
        time.sleep(10)  # > 3 reconciler passes: nothing more should go out

        rows = query('select id, "to", status, send_at, created_at, sent_at, attempts from notifications')
        def reasons(pattern):
            return {r[0] for r in query("select n.id from notification_events e join notifications n on n.seq = "
                                        "e.notification_id where e.reason like ?", (pattern,))}
        recovered, late_rec = reasons("recovered%"), reasons("%recorded late%")
        received = collections.Counter()
        first_at: dict[str, float] = {}
        for ln in open(sinkfile):
            parts = ln.rstrip("\n").split("\t")
            if len(parts) != 3:
                continue
            at, rc = float(parts[0]), parts[1].lower()
            received[rc] += 1
            first_at.setdefault(rc, at)
        by_to = {r[1].lower(): r for r in rows}
        st = collections.Counter(r[2] for r in rows if r[0] in ids)
        not_sent = [(r[0], r[2]) for r in rows if r[0] in ids and r[2] != "sent"]
        dups = {t: c for t, c in received.items() if c > 1}
        lost = [t for t, r in by_to.items() if r[0] in ids and received[t] == 0]
        result.update(statuses=dict(st), not_sent=not_sent[:20], emails_received=sum(received.values()),
                      duplicates=len(dups), dup_detail=[(t, c, str(by_to.get(t, ("?",))[0]) in recovered,
                                                         str(by_to.get(t, ("?",))[0]) in late_rec,
                                                         by_to.get(t, (0,) * 7)[6]) for t, c in dups.items()][:20],
                      lost=len(lost), lost_detail=lost[:10], recovered=len(recovered),
                      recorded_late=len(late_rec), workers_started=wcount,
                      rows_not_accepted=sum(1 for r in rows if r[0] not in ids))

        # delayed sends: not before send_at, how late after it
        def ts(v):
            if isinstance(v, str):
                v = datetime.fromisoformat(v)
            if v.tzinfo is None:
                v = v.replace(tzinfo=UTC)
            return v.timestamp()
        lateness = []
        early = []
        for i, _a in answers.items():
            if "delay_seconds" not in items[i]:
                continue
            r = next((r for r in [by_to.get(items[i]["to"].lower())] if r), None)
            if r is None or r[3] is None or items[i]["to"].lower() not in first_at:
                continue
            d = first_at[items[i]["to"].lower()] - ts(r[3])
            lateness.append((d, r[0], ts(r[3])))
            if d < -0.01:
                early.append((r[0], round(d, 3)))
        lateness.sort()
        if lateness:
            ls = [d for d, _, _ in lateness]
            result["delayed"] = {"n": len(ls), "early": early[:10], "min": round(ls[0], 2),
                                 "median": round(ls[len(ls) // 2], 2), "p90": round(ls[int(len(ls) * .9)], 2),
                                 "p99": round(ls[int(len(ls) * .99)], 2), "max": round(ls[-1], 2),
                                 "worst": [(round(d, 1), nid, round(due - t_load, 1)) for d, nid, due in lateness[-5:]]}
            result["delayed"]["worst_history"] = {nid: [
                (round(ts(at) - t_load, 2), frm, to, (reason or "")[:90]) for at, frm, to, reason in query(
                    "select e.at, e.from_status, e.to_status, e.reason from notification_events e join notifications n"
                    " on n.seq = e.notification_id where n.id = ? order by e.id", (nid,))]
                for _, nid, _ in lateness[-3:]}
            calm = [d for d, _, due in lateness if not any(s - 30 < due < e + 5 for s, e, _ in windows)]
            if calm:
                result["delayed_due_far_from_faults_max_s"] = round(max(calm), 2)

        # callbacks: every one owed posted; duplicates only under the same event id
        events = collections.Counter()
        by_nid = collections.defaultdict(set)
        for _, eid, nid, _status in cb_rows():
            events[eid] += 1
            by_nid[nid].add(eid)
        result["callbacks"] = {
            "owed": len(owed), "posted": sum(1 for n in owed if n in by_nid),
            "missing": sorted(owed - set(by_nid))[:10], "missing_n": len(owed - set(by_nid)),
            "posts": sum(events.values()), "dup_events": sum(1 for c in events.values() if c > 1),
            "nids_with_several_event_ids": [(n, sorted(e)) for n, e in by_nid.items() if len(e) > 1][:5],
            "unowed": sum(1 for n in by_nid if n not in owed),
            "wrong_event_id": sum(1 for n, es in by_nid.items() for e in es if e != f"{n}:sent"),
        }

        # the metric over a fault-free tail
        def metric():
            req = urllib.request.Request(base + "/metrics", headers={
                "Authorization": "Basic " + base64.b64encode(f"{op_user}:{op_pass}".encode()).decode()})
            text = urllib.request.urlopen(req, timeout=10).read().decode()
            return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                       if ln.startswith("notifier_notifications_sent_total"))
        sent_db_before = statuses().get("sent", 0)
        m0 = metric()
        result["metric_sent_total_at_end"] = m0
        result["sent_rows_at_end"] = sent_db_before
        tail_ids = []
        if args.tail:
            for i in range(args.tail):
                req = urllib.request.Request(base + "/api/notifications/send", method="POST", data=json.dumps(
                    {"to": f"tail{i:04d}-{args.tag}@example.com", "subject": "t", "text": "t"}).encode(),
                    headers={"Content-Type": "application/json", "X-API-Key": key})
                with urllib.request.urlopen(req, timeout=30) as resp:
                    tail_ids.append(json.loads(resp.read())["id"])
            end = time.time() + 60
            while time.time() < end and statuses().get("sent", 0) < sent_db_before + args.tail:
                time.sleep(1)
            end = time.time() + 30
            m1 = metric()
            while m1 - m0 != args.tail and time.time() < end:
                time.sleep(1)
                m1 = metric()
            result["tail"] = {"sent_rows_delta": statuses().get("sent", 0) - sent_db_before, "metric_delta": m1 - m0}
    finally:
        for p in reversed(procs):
            if p.poll() is None and p is not redis_box.get("p"):
                p.send_signal(signal.SIGTERM)
        for p in procs:
            if p is not redis_box.get("p") and p.poll() is None:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        rp = redis_box.get("p")
        if rp is not None and rp.poll() is None:
            os.kill(rp.pid, signal.SIGCONT)
            rp.kill()
            rp.wait()
        if pg is not None:
            drop_database(pg)
    # logs: tracebacks and ERROR lines by kind
    kinds = collections.Counter()
    examples = {}
    for name in sorted(os.listdir(logdir)):
        if not name.endswith(".log"):
            continue
        who = name.rstrip("0123456789.log") or name
        for ln in open(os.path.join(logdir, name), errors="replace"):
            try:
                d = json.loads(ln)
            except ValueError:
                if "Traceback" in ln or "Error" in ln:
                    kinds[(who, "raw", ln.strip()[:120])] += 1
                continue
            if not isinstance(d, dict):
                continue
            exc = d.get("exc_info") or ""
            if d.get("level") in ("ERROR", "CRITICAL") or "Traceback" in exc:
                last = exc.strip().splitlines()[-1][:120] if exc else ""
                msg = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<id>", d.get("message", ""))[:120]
                k = (who, d.get("level"), msg if not last else f"{msg} | {last}")
                kinds[k] += 1
                examples.setdefault(k, (name, ln[:600]))
    handed = []
    for name in sorted(os.listdir(logdir)):
        if name.startswith("worker"):
            handed += [ln for ln in open(os.path.join(logdir, name), errors="replace") if "handed on" in ln]
    result["handed_on_lines"] = [json.loads(ln)["message"][:100] for ln in handed][:5]
    result["log_errors"] = [{"who": w, "level": lv, "what": m, "n": n} for (w, lv, m), n in kinds.most_common(25)]
    with open(os.path.join(logdir, "error-examples.json"), "w") as fh:
        json.dump([{"k": list(k), "file": v[0], "line": v[1]} for k, v in examples.items()], fh, indent=1)
    result["seconds"] = round(time.time() - t_origin)
    print(json.dumps(result), flush=True)
    with open(os.path.join(logdir, "result.json"), "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
