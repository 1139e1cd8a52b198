# make run   - create .venv, install mailroster, serve the embedded default config (conf.d/) with sockets in ./var
# make test  - the test suite (real postmap, real daemons started by fixtures)
# make bench - side by side: socketmap against a minimal uvloop floor, Dovecot auth/userdb against a real Dovecot,
#              the internal directory (SQLite, cache off) at 1k, 100k and 1M principals
#              and the SQL/LDAP directories on private PostgreSQL, MariaDB and slapd (cache off)
# make lint  - ruff and mypy (strict) on the package

PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed-stamp

.PHONY: run test bench lint clean

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: on Debian, apt-get install python3-venv"; exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

var/run.toml:
	@mkdir -p var/run var/lib
	@printf '%s\n' \
	  '# Written by make run: the shipped conf.d with sockets and state under ./var, no root needed.' \
	  '[server]' \
	  'run-dir = "$(CURDIR)/var/run"' \
	  'state-dir = "$(CURDIR)/var/lib"' \
	  '[server.listener.socketmap]' \
	  'bind = "unix:socketmap"' \
	  'socket = { mode = "0660", group = "" }' > $@

run: $(STAMP) var/run.toml
	$(BIN)/mailroster serve -c conf.d -c var/run.toml

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m bench.run

lint: $(STAMP)
	$(BIN)/ruff check daemon protocols backends tests bench
	$(BIN)/ruff format --check daemon protocols backends tests bench
	@rm -rf .lint && mkdir -p .lint/mailroster && for d in daemon protocols backends; do ln -s ../../$$d .lint/mailroster/$$d; done
	cd .lint && MYPYPATH=. ../$(BIN)/mypy --config-file ../setup.cfg -p mailroster

clean:
	rm -rf $(VENV) var .lint build dist *.egg-info .mypy_cache .pytest_cache .ruff_cache
