"""modules.sd_models: ``model_data.sd_model`` is the loaded model or None (never loads)."""


class SdModelData:
    def __init__(self):
        self.sd_model = None


model_data = SdModelData()
