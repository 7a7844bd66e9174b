"""The record format, TensorFlow-free: what a shard holds and how it is written and read.

    schema.py   the record schema, defined once (FEATURES, Record, grades, tf_feature_spec)
    example.py  tf.train.Example serialisation and TFRecord framing, both ways
    writer.py   shard names, the size-based shard plan and the ShardWriter
    reader.py   read shards back as numpy values without TensorFlow
    info.py     the metadata beside the shards (drpipe_info.json, TFDS's files, the version)
    files.py    files written whole or not at all (temporary names, atomic writes)
"""
