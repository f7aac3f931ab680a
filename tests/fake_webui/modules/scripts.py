"""modules.scripts: the Script base class and the args objects of the hooks we implement."""

AlwaysVisible = object()


class PostprocessImageArgs:
    def __init__(self, image):
        self.image = image


class Script:
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    infotext_fields = None
    paste_field_names = None

    def title(self):
        raise NotImplementedError()

    def show(self, is_img2img):
        return True

    def process(self, p, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def postprocess_image_after_composite(self, p, pp, *args):
        pass

    def elem_id(self, item_id):
        return f"script_{'img2img' if self.is_img2img else 'txt2img'}_{item_id}"
