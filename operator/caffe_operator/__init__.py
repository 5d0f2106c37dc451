"""The caffe-serving operator: CRD model, kopf handlers, child builders, gateway, local mode."""
