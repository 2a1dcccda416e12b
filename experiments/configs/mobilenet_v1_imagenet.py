"""AMC (He et al., ECCV 2018) on MobileNet-V1 / ImageNet at 50% of the MACs: 70.9 -> 70.5 top-1.

AMC starts from a pretrained MobileNet (70.9%); here the baseline is trained: SGD 0.1 per 256 images with
momentum 0.9, weight decay 4e-5, 5 warm-up epochs then cosine over 150 epochs (the common SGD recipe for
MobileNets). The search is AMC's: DDPG, 400 episodes with 100 of warm-up, channels rounded to 8, keep ratios
from 0.2, least-squares reconstruction of the consuming layer, 3,000 held-out images per reward. Fine-tuning:
30 epochs at 0.01, cosine (ours; the paper gives none). On 8 accelerators set `--set train.batch_size=1024
--set train.learning_rate=0.4`. Run: `agmc reproduce experiments/configs/mobilenet_v1_imagenet.py --workdir
runs/amc_mobilenet_v1 --data-dir DIR` (ImageNet prepared as array_record in DIR).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "published": {"paper": "AMC (He et al., ECCV 2018)", "metric": "top-1 (%)", "dense": 70.9,
                      "compressed": 70.5, "budget": "50% MACs"},
        "train": {"model": "mobilenet_v1", "dataset": "imagenet2012", "epochs": 150, "batch_size": 256,
                  "learning_rate": 0.1, "weight_decay": 4e-5, "schedule": "cosine", "warmup_epochs": 5, "seed": 0,
                  "input_shape": None, "model_kwargs": {"width": 1.0}},
        "compress": {"method": "amc", "target_macs": 0.5, "episodes": 400, "warmup_episodes": 100,
                     "reward": "acc", "reward_images": 3000, "lbound": 0.2, "round_to": 8, "criterion": "lstsq",
                     "rerank": 0, "finetune_epochs": 30, "lr": 0.01, "seed": 0},
    })
