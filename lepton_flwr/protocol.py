"""Every message key of lepton-flwr's protocol, in one place.

Where Flower has a key with the same meaning, it is Flower's own, so that Flower's mods
and strategies compose with ours (Flower's ``fixedclipping_mod`` clips for our
``DPFedAvg(clipping_side="client")``, for instance).
"""

from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

# ---- train config (server -> client) ----------------------------------------------------
SERVER_ROUND = "server-round"  # Flower's FedAvg injects it too
CLIPPING_NORM = KEY_CLIPPING_NORM  # C, the bound on the update's L2 norm (Flower's key)
NOISE_SHARE_STD = "dp-noise-share-std"  # HE + DP: std of one client's Gaussian noise share
UPDATE_SCALE = "dp-update-scale"  # HE + DP: 1/d, the fixed denominator of the mean
SHARE_BOUND = "dp-share-bound"  # HE + DP: public bound B = (C + 10 σ) / d; shares clamp to ±B
# (HE + DP: σ, B and 1/d depend on N, q, z, C and the run's settings only, never on s or r)
WEIGHTED_BY = "he-weighted-by"  # HE: the reply metric clients weight their update by
WEIGHT_SCALE = "he-weight-scale"  # HE: clients encrypt (count / scale) * update
VALUE_BOUND = "he-value-bound"  # HE: public bound b; clients clamp their values to ±b
RUN_ID = "lepton-run-id"  # our strategies: the run's id (32 hex digits), kept across resumes
RESUMED_AFTER = "lepton-resumed-after"  # our strategies: the round a resumed run continues from

# ---- reply metrics (client -> server) ---------------------------------------------------
NUM_EXAMPLES = "num-examples"  # Flower's default ``weighted_by_key``
NORM_BIT = KEY_NORM_BIT  # 1 when the update was clipped (Flower's key and meaning)
DP_SHARE_STD = "dp-share-std"  # dp_share_mod: the noise std this share carries
HE_WEIGHT = "he-weight"  # the weight he_mod encrypts with (1 for a DP share)
HE_BOUND = "he-bound"  # a public bound on the values he_mod encrypts (declared in the header)

TRAIN_LOSS = "train-loss"  # our ClientApp's training loss
CLIENT_EPSILON = "client-epsilon"  # DP-SGD: the client's cumulative ε (the round takes the max)
DPSGD_NOISE_MULTIPLIER = "dpsgd-noise-multiplier"

# ---- error replies (client -> server) ---------------------------------------------------
MODEL_REFUSED = "refused the global model"  # in the reason: a decryption failed the bound
FLOOR_REFUSAL = "privacy floor: "  # the reason's start: the node's own floor said no

# ---- node config / run config (per SuperNode, per run) ----------------------------------
SECRET_CONTEXT = "he-secret-context"  # path of the clients' secret CKKS context
PARTITION_ID = "partition-id"  # our ClientApp: which data partition this node holds
NUM_PARTITIONS = "num-partitions"  # (Flower's simulation sets both the same way)
DATA_ROOT = "data-root"  # our ClientApp: the node's data folder (node config only)
DEVICE = "device"  # our ClientApp: cpu | cuda | auto, this node's own (node config)
STATE_DIR = "state-dir"  # a folder for node-local state that must survive restarts
SECAGG_SIGNING_KEY = "secagg-signing-key"  # the node's EC private key: signs its round keys
SECAGG_TRUSTED_KEYS = "secagg-trusted-keys"  # OpenSSH public keys whose signatures it takes
# A client's local privacy floor (node config only): requests below it are refused.
MIN_SHARE_NOISE = "dp-min-share-noise-multiplier"  # HE + DP: least σ_share / C accepted
MAX_CLIP_NORM = "dp-max-clip-norm"  # HE + DP: largest C accepted
DPSGD_MAX_EPSILON = "dpsgd-max-epsilon"  # DP-SGD: largest cumulative ε the node will spend
DPSGD_MIN_NOISE = "dpsgd-min-noise-multiplier"  # DP-SGD: least noise multiplier accepted
DPSGD_DELTA = "dpsgd-delta"  # DP-SGD: the δ at which the node computes its own ε
HE_MAX_DECRYPTIONS = "he-max-decryptions"  # HE: the most models the node decrypts
ALLOW_EVALUATION = "allow-evaluation"  # false: no federated evaluation (default under a floor)

# ---- secure aggregation (issue 20): protocol stages travel as train messages ---------------
# A train message whose config names a stage carries no model: he_mod answers it itself
# (a ConfigRecord of public keys and encrypted shares) and never calls the handler.
SECAGG_STAGE = "lepton-secagg-stage"  # "advertise" | "share-keys" | "unmask"
SECAGG_MASKED = "lepton-secagg-masked"  # train config: mask the upload for this round

# ---- node state (context.state, never sent) ---------------------------------------------
SECAGG_STATE = "lepton-secagg"  # secure aggregation: the node's keys and answered stages
DPSGD_STATE = "lepton-dpsgd"  # DP-SGD: the client's accountant history
HE_MANIFEST = "lepton-he-manifest"  # HE: the model's layout, from the first plaintext model

# ---- privacy figures a DP strategy returns in its train MetricRecord each round --------
EPSILON = "epsilon"  # ε spent so far, at DELTA
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"  # z planned for the round
# HE + DP no longer releases these two nor CLIENTS_REPORTED (issue 19 item 2: the counts
# stay on the server, ``HEDPFedAvg.server_counts``); kept for readers of older metrics.
NOISE_MULTIPLIER_PRESENT = "noise-multiplier-present"  # (old HE + DP) z the reporters carried
NOISE_STD_PRESENT = "noise-std-present"  # (old HE + DP) std of the noise on the released mean
CLIP_NORM = "clip-norm"  # C used in the round (adaptive clipping changes it)
CLIENTS_SAMPLED = "clients-sampled"
CLIENTS_ACCEPTED = "clients-accepted"  # DP-FedAvg: updates in the sum
CLIENTS_REPORTED = "clients-reported"  # (old HE + DP) shares in the sum

PRIVACY_METRICS = (
    EPSILON,
    DELTA,
    NOISE_MULTIPLIER,
    NOISE_MULTIPLIER_PRESENT,
    NOISE_STD_PRESENT,
    CLIP_NORM,
    CLIENTS_SAMPLED,
    CLIENTS_ACCEPTED,
    CLIENTS_REPORTED,
)
