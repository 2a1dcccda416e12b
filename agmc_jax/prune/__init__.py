"""Channel and weight masks, selection criteria, least-squares reconstruction, BatchNorm re-estimation
and slimming: the one pruning API over a traced `Network`.

    masks = channel_masks(net, variables, keep, criterion)   # or weight_masks(net, variables, keep)
    masks = channel_masks(net, variables, keep, "infodrop", images)  # criteria may read calibration images
    masks = weight_masks(net, variables, keep, weight_importance(net, variables, fit_alphas(net, variables, images)))
    masked = apply_masks(net, variables, masks)
    refitted = reconstruct(net, variables, masks, images)    # AMC's least squares
    masked = recalibrate(net.module, masked, images, **net.call_kwargs)
    module, small = slim(net, masked, masks)
    folded_module, folded = fold_batchnorm(trace(module, small, shape), small)  # inference: BatchNorm in the convs
    trained, _ = admm_train(module, variables, feed, Sparsity(net), Target(filters=counts))  # ADMM (AutoCompress)
    masks = purify(net, trained, Sparsity(net).masks(trained, Target(filters=counts))).masks
"""
from agmc_jax.prune.admm import (AdmmConfig, AdmmState, Feed, FitConfig, Penalized, Sparsity, Target, admm_init,
                                 admm_penalty, admm_train, admm_update, array_feed, check_admm_config, masked_train)
from agmc_jax.prune.batchnorm import apply_recalibrated, recalibrate
from agmc_jax.prune.infodrop import (InfoDropConfig, InfoDropout, channel_information, fit_alphas,
                                     information_dropout, layer_alphas, split_variables, weight_importance)
from agmc_jax.prune.lstsq import prune_counts, reconstruct
from agmc_jax.prune.masks import (CRITERIA, apply_masks, channel_importance, channel_masks, channel_ranks,
                                  keep_vectors, masks_from_vectors, register_criterion, top_channels,
                                  vectors_from_masks, weight_masks)
from agmc_jax.prune.purify import Purified, purify, sparse_cost
from agmc_jax.prune.slim import Slimmed, slim, slim_variables
from agmc_jax.prune.fold import Folded, fold_batchnorm, fold_pairs, fold_variables

__all__ = ["CRITERIA", "apply_masks", "apply_recalibrated", "channel_importance", "channel_masks", "channel_ranks",
           "keep_vectors", "masks_from_vectors", "prune_counts", "recalibrate", "reconstruct",
           "top_channels", "vectors_from_masks", "weight_masks", "Slimmed", "slim", "slim_variables",
           "Folded", "fold_batchnorm", "fold_pairs", "fold_variables",
           "register_criterion", "InfoDropConfig", "InfoDropout", "channel_information", "fit_alphas",
           "information_dropout", "layer_alphas", "split_variables", "weight_importance", "AdmmConfig", "AdmmState",
           "Feed", "FitConfig", "Penalized", "Purified", "Sparsity", "Target", "admm_init", "admm_penalty",
           "admm_train", "admm_update", "array_feed", "check_admm_config", "masked_train", "purify", "sparse_cost"]
