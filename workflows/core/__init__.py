"""The run machinery every stage shares: stage directories and the resumable raw-row store
(stage), local/S3 storage, typed configs, reconcile (nothing lost), user-facing errors,
summaries, and streaming a dataset through an engine actor pool. No stage logic lives here."""
