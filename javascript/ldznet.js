// LD-ZNet mask: helpers for the accordion's Preview button and the results-row send button.
// gradio passes the inputs of a click as arguments; these return them with the placeholders
// (first argument) replaced by what only the page knows.

function ldznet_preview_args(...args) {
    // args[0]: placeholder for the img2img mode tab (0 img2img ... 4 Inpaint upload, 5 Batch).
    args[0] = get_tab_index('mode_img2img');
    return args;
}

function ldznet_send_args(gallery, placeholder, ...rest) {
    // The selected result (selected_gallery_index() is -1 when none is selected: the server takes the first).
    return [gallery, selected_gallery_index(), ...rest];
}

function ldznet_switch_to_inpaint_upload() {
    switch_to_img2img_tab(4);
    return [];
}
