"""pyedge.fleet: federated LoRA fine-tuning over many devices with Flower (issue 17).

- aggregate.py  FedAvg of the factors / exact average of the products re-factored by SVD
- local.py      one device's round without Flower (training, evaluation, demo shards)
- client_app.py the Flower ClientApp (numpy + pyedge, no torch)
- server_app.py the Flower ServerApp (round loop, resume, dropped nodes)
- store.py      global adapters per round (PEFT) + metrics.jsonl; where a restart resumes
- deploy.py     certificates, keys, SuperLink/SuperNode processes on one machine
- app/          the Flower app folder (`flwr run pyedge/fleet/app ...`)

Only aggregate/local/store import without flwr; the apps need `pip install pyedge[fleet]`.
"""
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent / "app"
