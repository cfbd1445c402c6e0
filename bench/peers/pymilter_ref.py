"""The benchmarks' reference milter written with pymilter (bench-only; see setup-peers.sh).

Every callback continues; end of message adds a header and accepts.
Run: ``bench/.venv-peers/bin/python bench/peers/pymilter_ref.py SPEC [--eom-only]``.
"""

import sys

import Milter


class Reference(Milter.Base):
    def connect(self, hostname, family, hostaddr):
        return Milter.CONTINUE

    def hello(self, hostname):
        return Milter.CONTINUE

    def envfrom(self, sender, *args):
        return Milter.CONTINUE

    def envrcpt(self, recipient, *args):
        return Milter.CONTINUE

    def data(self):
        return Milter.CONTINUE

    def header(self, name, value):
        return Milter.CONTINUE

    def eoh(self):
        return Milter.CONTINUE

    def body(self, chunk):
        return Milter.CONTINUE

    def eom(self):
        self.addheader("X-Bench", "yes")
        return Milter.ACCEPT


class EndOfMessageOnly(Milter.Base):
    def eom(self):
        self.addheader("X-Bench", "yes")
        return Milter.ACCEPT


if __name__ == "__main__":
    Milter.factory = EndOfMessageOnly if "--eom-only" in sys.argv else Reference
    Milter.set_flags(Milter.ADDHDRS)
    Milter.runmilter("reference", sys.argv[1], timeout=600)
