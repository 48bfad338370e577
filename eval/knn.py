"""kNN evaluation of frozen features: faiss exact cosine search, weighted (T=0.07) and majority votes (``fkd-knn``).

    python eval/knn.py --checkpoint runs/fkd/model.safetensors --data synthetic
    python eval/knn.py --checkpoint effnet-lite0 --data imagefolder:/data/imagenet --device cuda
    python eval/knn.py --checkpoint random:resnet18 --stem small --input-size 64
    python eval/knn.py --checkpoint pixels:32
    torchrun --nproc-per-node 8 eval/knn.py --checkpoint ... --data imagefolder:/data/imagenet

Flags: ``--help`` (the command is :mod:`fkd_ssl.commands.knn`).
"""

from fkd_ssl.commands.knn import console, main  # noqa: F401  (main: for callers that import the script)

if __name__ == "__main__":
    console()
