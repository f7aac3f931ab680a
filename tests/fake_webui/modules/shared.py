"""modules.shared: opts, state, cmd_opts, and sd_model (a plain attribute here, not a lazy property)."""
import types

from modules import sd_models


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, **kwargs):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.onchange, self.section, self.refresh = onchange, section, refresh
        self.reload_ui = False

    def needs_reload_ui(self):
        self.reload_ui = True
        return self


class Options:
    def __init__(self):
        self.data = {}
        self.data_labels = {}

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def set(self, key, value):
        self.data[key] = value
        info = self.data_labels.get(key)
        if info is not None and info.onchange is not None:
            info.onchange()


class State:
    """The fields and methods of modules.shared_state.State that jobs use."""

    def __init__(self):
        self.interrupted = False
        self.job = ""
        self.job_no = 0
        self.job_count = 0
        self.textinfo = None
        self.begun = 0

    def begin(self, job="(unknown)"):
        self.interrupted, self.job, self.job_no, self.job_count = False, job, 0, 0
        self.begun += 1

    def end(self):
        self.job = ""

    def nextjob(self):
        self.job_no += 1

    def interrupt(self):
        self.interrupted = True


opts = Options()
state = State()
cmd_opts = types.SimpleNamespace(api=True, nowebui=False, api_auth=None, medvram=False, lowvram=False,
                                 medvram_sdxl=False)


def __getattr__(name):
    if name == "sd_model":
        return sd_models.model_data.sd_model
    raise AttributeError(name)
