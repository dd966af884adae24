"""The SMTP baseline's client: sends its share of messages over ONE reused smtplib connection.

`python -m bench.smtp_client --port P --first N --count K --start-at T` connects, waits until wall
time T (so every client starts together), sends K messages with X-Notification-ID raw-N, raw-N+1,
..., and prints JSON: how many were accepted and when it started and finished.
"""

from __future__ import annotations

import argparse
import json
import smtplib
import time
from email.utils import formatdate

MESSAGE = (
    "From: notifier@bench.example\r\n"
    "To: {to}\r\n"
    "Subject: bench raw {n}\r\n"
    "Date: {date}\r\n"
    "Message-ID: <raw-{n}@bench.example>\r\n"
    "X-Notification-ID: raw-{n}\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=\"utf-8\"\r\n"
    "Content-Transfer-Encoding: 7bit\r\n"
    "\r\n"
    "Hello from the notifier benchmark.\r\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--start-at", type=float, default=0.0)
    args = parser.parse_args()
    smtp = smtplib.SMTP(args.host, args.port, timeout=30)
    smtp.ehlo()
    time.sleep(max(0.0, args.start_at - time.time()))
    started = time.time()
    accepted = 0
    for n in range(args.first, args.first + args.count):
        to = f"raw-{n}@bench.example"
        body = MESSAGE.format(to=to, n=n, date=formatdate(usegmt=True)).encode()
        if not smtp.sendmail("notifier@bench.example", [to], body):
            accepted += 1
    finished = time.time()
    smtp.quit()
    print(json.dumps({"accepted": accepted, "started": started, "finished": finished}))


if __name__ == "__main__":
    main()
