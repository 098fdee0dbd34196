module dreambooth.local/testbed/pause

go 1.26.0
