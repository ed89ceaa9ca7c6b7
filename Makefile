# The two set-up commands of the README. Each creates or reuses .venv (tools/dev_env.sh) first.
.PHONY: demo test lint env

env:
	bash tools/dev_env.sh

demo: env
	PYTHONPATH=$(CURDIR) .venv/bin/python tools/train_net.py --config-file configs/iounet_synthetic_R18.yaml

test: env lint
	PYTHONPATH=$(CURDIR) .venv/bin/python -m pytest tests -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
