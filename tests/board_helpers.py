"""TensorBoard's own reader over a log directory: what the TensorBoard app would list and show."""
from tensorboard.backend.event_processing import event_accumulator as ea

KEEP_ALL = {kind: 0 for kind in (ea.SCALARS, ea.IMAGES, ea.TENSORS, ea.HISTOGRAMS, ea.COMPRESSED_HISTOGRAMS,
                                 ea.AUDIO)}


def read_board(logdir: str) -> ea.EventAccumulator:
    """Every event of every event file under `logdir` (size_guidance 0: nothing sampled away)."""
    acc = ea.EventAccumulator(str(logdir), size_guidance=KEEP_ALL)
    acc.Reload()
    return acc


def text_tags(acc: ea.EventAccumulator) -> set[str]:
    """The tags TensorBoard's Text tab lists."""
    try:
        return set(acc.PluginTagToContent("text"))
    except KeyError:  # no text at all
        return set()


def text(acc: ea.EventAccumulator, tag: str) -> list[tuple[int, str]]:
    """(step, markdown) of each text event of `tag` (tensorboardX's tag + "/text_summary")."""
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]


def hparams(acc: ea.EventAccumulator) -> dict:
    """The run's hparams as the HParams tab reads them (its session-start summary)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    values = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in values.items()}


def hparam_metrics(acc: ea.EventAccumulator) -> list[str]:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/experiment"]
    return [m.name.tag for m in plugin_data_pb2.HParamsPluginData.FromString(content).experiment.metric_infos]
