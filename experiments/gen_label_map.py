"""ReLabel baseline: a classifier teacher's dense label maps of every whole training image.

    python experiments/gen_label_map.py --data imagefolder:/data/imagenet --teacher effnet-lite0 --out runs/labelmap
    python experiments/gen_label_map.py --data synthetic --teacher runs/classifier/model.safetensors --topk 5
    torchrun --standalone --nproc_per_node=8 experiments/gen_label_map.py --data ... --teacher ... --device cuda

Flags: ``--help``; the command: ``fkd_ssl/commands/gen_label_map.py``; format: ``docs/relabel.md``.
"""

from fkd_ssl.commands.gen_label_map import console, main  # noqa: F401 (main: what tests call in-process)

if __name__ == "__main__":
    console()
