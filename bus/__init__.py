"""NATS and JetStream plumbing: the log's streams and its one guarded append, publishes that
wait for their ack, the ordered and the durable readers, the reader process for long
catch-ups, and reading (and folding) the log up to now."""
