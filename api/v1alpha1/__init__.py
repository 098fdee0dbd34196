"""`dreambooth.dev/v1alpha1`: `sections` (what to train, shared with `dreambooth train` configs),
`pod_template` (what passes through to pods), `spec` (the DreamboothJob spec, status and CRD),
`labels` (the labels, annotations and container names other components select by)."""
