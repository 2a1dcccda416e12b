"""AMC (He et al., ECCV 2018) on ResNet-56 / CIFAR-10 at 50% of the MACs: 92.8 -> 91.9 top-1 after fine-tuning.

The baseline schedule is He et al. 2016's CIFAR recipe (SGD 0.1, momentum 0.9, weight decay 1e-4, batch 128;
cosine over 160 epochs in place of the steps at 32k/48k iterations). The search is AMC's: DDPG, 400 episodes
with 100 of warm-up, channels rounded to multiples of 8, keep ratios from 0.2, the accuracy reward on held-out
training images (our 5,000-image validation split), BatchNorm re-estimated. AMC's paper gives no CIFAR
fine-tuning schedule; ours is 40 epochs at 0.02, cosine. Run: `agmc reproduce experiments/configs/resnet56_cifar10.py
--workdir runs/amc_resnet56`.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "published": {"paper": "AMC (He et al., ECCV 2018)", "metric": "top-1 (%)", "dense": 92.8,
                      "compressed": 91.9, "budget": "50% MACs"},
        "train": {"model": "resnet56", "dataset": "cifar10", "epochs": 160, "batch_size": 128, "learning_rate": 0.1,
                  "weight_decay": 1e-4, "schedule": "cosine", "warmup_epochs": 0, "seed": 0,
                  "input_shape": None},
        "compress": {"method": "amc", "target_macs": 0.5, "episodes": 400, "warmup_episodes": 100,
                     "reward": "acc", "reward_images": 5000, "lbound": 0.2, "round_to": 8, "criterion": "l2",
                     "rerank": 0, "finetune_epochs": 40, "lr": 0.02, "seed": 0},
    })
