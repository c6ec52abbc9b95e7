#!/usr/bin/env python3
"""An SMTP server for the setup checks' tests (aiosmtpd 1.4): mail goes to a Maildir.

  smtp_server.py --port P --maildir DIR --mode plain|starttls|tls
                 [--cert PEM --key PEM] [--user U --password PW]

`starttls` requires STARTTLS before anything else; `tls` is TLS from the first byte
(SMTPS). With --user, AUTH (PLAIN/LOGIN) is required and only U/PW is accepted.
Prints one line, "ready", once it accepts connections; stops on SIGTERM/SIGKILL.
"""

import argparse
import signal
import ssl
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import AuthResult, LoginPassword


def authenticator_for(user, password):
    expected = LoginPassword(user.encode(), password.encode())

    def authenticate(server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and auth_data == expected
        return AuthResult(success=ok, handled=False)

    return authenticate


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--maildir", required=True)
    parser.add_argument("--mode", choices=["plain", "starttls", "tls"], default="plain")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--user")
    parser.add_argument("--password")
    args = parser.parse_args()

    options = {}
    if args.mode != "plain":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
        if args.mode == "starttls":
            options.update(tls_context=context, require_starttls=True)
        else:
            options.update(ssl_context=context)
    if args.user:
        options.update(
            authenticator=authenticator_for(args.user, args.password or ""),
            auth_required=True,
            # Implicit TLS is TLS too, but aiosmtpd only counts STARTTLS as such.
            auth_require_tls=args.mode == "starttls",
        )

    controller = Controller(Mailbox(args.maildir), hostname=args.host, port=args.port, **options)
    controller.start()
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    main()
