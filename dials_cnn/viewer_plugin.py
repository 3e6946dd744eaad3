"""Hit / Maybe / Miss scoring attached to the real ``dials.image_viewer`` (DIALS 3.12, wxPython 4).

:class:`AnnotationFrame` is the viewer's own ``SpotFrame`` (image chooser, zoom, contrast,
settings, spot overlays, mask and score tools all unchanged) with a :class:`ScoringPanel` added
under the image. The panel only talks to a :class:`dials_cnn.scoring.ScoringSession`, which owns
the annotation file; the viewer's image list and the session share positions (0-based).

Keys (anywhere in the main window, also right after typing an image number into "Jump:"):
j HIT, k MAYBE, l MISS, u undo the last score, f jump to the first unscored image.
"""

import logging
import os

import wx
from dials.util.image_viewer.spotfinder_frame import SpotFrame
from dials.util.image_viewer.spotfinder_wrap import chooser_wrapper
from wxtbx.phil_controls.intctrl import IntCtrl as PhilIntCtrl

from dials_cnn.annotations import LABELS
from dials_cnn.scoring import RUN_ORDER, UNCERTAIN_ORDER, ScoringError, image_locations

logger = logging.getLogger("dials.cnn_annotate")

SCORE_KEYS = {"J": "HIT", "K": "MAYBE", "L": "MISS"}
UNDO_KEY = "U"
FIRST_UNSCORED_KEY = "F"
ORDER_NAMES = {RUN_ORDER: "Run order", UNCERTAIN_ORDER: "Most uncertain first"}
LABEL_COLOURS = {"HIT": (0, 140, 0), "MAYBE": (200, 120, 0), "MISS": (190, 0, 0), None: (110, 110, 110)}


class ScoringPanel(wx.Panel):
    """Buttons, the current label, progress and (with a model) the CNN's probabilities."""

    def __init__(self, frame, session):
        super().__init__(frame)
        self.frame = frame
        self.session = session

        self.label_text = wx.StaticText(self, label="", size=(110, -1))
        font = self.label_text.GetFont()
        font.SetPointSize(font.GetPointSize() + 6)
        font.SetWeight(wx.FONTWEIGHT_BOLD)
        self.label_text.SetFont(font)

        self.buttons = {}
        buttons = wx.BoxSizer(wx.HORIZONTAL)
        for label, key in zip(LABELS, SCORE_KEYS):
            button = wx.Button(self, label=f"{label} ({key.lower()})")
            button.SetForegroundColour(LABEL_COLOURS[label])
            button.Bind(wx.EVT_BUTTON, lambda event, label=label: self.score(label))
            buttons.Add(button, 0, wx.RIGHT, 4)
            self.buttons[label] = button
        self.undo_button = wx.Button(self, label=f"Undo ({UNDO_KEY.lower()})")
        self.undo_button.Bind(wx.EVT_BUTTON, lambda event: self.undo())
        buttons.Add(self.undo_button, 0, wx.RIGHT, 4)
        self.first_unscored_button = wx.Button(self, label=f"First unscored ({FIRST_UNSCORED_KEY.lower()})")
        self.first_unscored_button.Bind(wx.EVT_BUTTON, lambda event: self.go_to_first_unscored())
        buttons.Add(self.first_unscored_button, 0, wx.RIGHT, 4)

        self.order_choice = None
        if session.probabilities is not None:
            self.order_choice = wx.Choice(self, choices=list(ORDER_NAMES.values()))
            self.order_choice.SetSelection(list(ORDER_NAMES).index(session.order_name))
            self.order_choice.Bind(wx.EVT_CHOICE, self.OnOrderChoice)
            buttons.Add(self.order_choice, 0, wx.ALIGN_CENTER_VERTICAL)

        self.image_text = wx.StaticText(self, label="")
        self.progress_text = wx.StaticText(self, label="")
        self.model_text = wx.StaticText(self, label="")
        self.message_text = wx.StaticText(self, label="")

        top = wx.BoxSizer(wx.HORIZONTAL)
        top.Add(wx.StaticText(self, label="Expert:"), 0, wx.ALIGN_CENTER_VERTICAL | wx.RIGHT, 6)
        top.Add(self.label_text, 0, wx.ALIGN_CENTER_VERTICAL | wx.RIGHT, 10)
        top.Add(buttons, 0, wx.ALIGN_CENTER_VERTICAL)
        info = wx.BoxSizer(wx.HORIZONTAL)
        for text in (self.image_text, self.progress_text, self.model_text):
            info.Add(text, 0, wx.RIGHT, 18)
        info.Add(self.message_text, 1)
        sizer = wx.BoxSizer(wx.VERTICAL)
        sizer.Add(top, 0, wx.EXPAND | wx.ALL, 4)
        sizer.Add(info, 0, wx.EXPAND | wx.LEFT | wx.RIGHT | wx.BOTTOM, 4)
        self.SetSizer(sizer)

    # --- actions (also what the tests call) -----------------------------------------------------
    @property
    def position(self):
        """The viewer's current image (0-based position in its image list)."""
        return self.frame.images.selected_index

    def score(self, label):
        """Score the current image, write the file, and advance to the next image of the order."""
        position = self.position
        try:
            self.session.score(position, label)
        except ScoringError as error:
            self.show_message(str(error), error=True)
            logger.error(str(error))
            return
        logger.info("%s %s  (%d / %d scored)", self.session.key(position), label, self.session.scored, self.session.total)
        following = self.session.next_position(position)
        if following is None:
            self.refresh()
            self.show_message(self._end_message())
        else:
            self.go_to(following)

    def undo(self):
        """Take back the last score and show that image again so it can be re-scored."""
        try:
            position = self.session.undo()
        except ScoringError as error:
            self.show_message(str(error), error=True)
            return
        if position is None:
            self.show_message("Nothing to undo in this session.")
            return
        logger.info("undo: %s is now %s", self.session.key(position), self.session.label(position) or "unscored")
        self.go_to(position)
        self.show_message(f"Undone: {self.session.key(position)} is {self.session.label(position) or 'unscored'} again.")

    def go_to_first_unscored(self):
        position = self.session.first_unscored()
        if position is None:
            self.show_message("All images are scored.")
        else:
            self.go_to(position)

    def set_order(self, name):
        self.session.set_order(name)
        if self.order_choice is not None:
            self.order_choice.SetSelection(list(ORDER_NAMES).index(name))
        self.go_to_first_unscored()

    def go_to(self, position):
        if position == self.position:
            self.refresh()
        else:
            self.frame.load_image(self.frame.images[position])  # refreshes through AnnotationFrame.load_image

    # --- display ------------------------------------------------------------------------------
    def refresh(self):
        position = self.position
        if position is None:
            return
        label = self.session.label(position)
        self.label_text.SetLabel(label or "—")
        self.label_text.SetForegroundColour(LABEL_COLOURS[label])
        self.image_text.SetLabel(f"Image {position + 1}: {self.session.key(position)}")
        self.progress_text.SetLabel(f"Scored {self.session.scored} / {self.session.total}")
        probabilities = self.session.probabilities_of(position)
        if probabilities is not None:
            if any(value != value for value in probabilities):  # NaN: the classifier could not read it
                self.model_text.SetLabel("CNN: could not classify this image")
            else:
                self.model_text.SetLabel(
                    "CNN: " + "  ".join(f"{name} {value:.2f}" for name, value in zip(LABELS, probabilities))
                )
        self.undo_button.Enable(self.session.can_undo)
        self.show_message("")
        self.Layout()

    def show_message(self, text, error=False):
        self.message_text.SetForegroundColour((190, 0, 0) if error else (60, 60, 60))
        self.message_text.SetLabel(text)
        self.Layout()

    def _end_message(self):
        left = self.session.total - self.session.scored
        if left == 0:
            return "Last image of this order; all images are scored."
        return f"Last image of this order; {left} unscored left (press f)."

    def OnOrderChoice(self, event):
        self.set_order(list(ORDER_NAMES)[self.order_choice.GetSelection()])


class AnnotationFrame(SpotFrame):
    """``dials.image_viewer``'s main window with a :class:`ScoringPanel` under the image."""

    def __init__(self, *args, **kwds):
        session = kwds.pop("session")
        self.scoring_panel = None
        super().__init__(*args, **kwds)
        self.scoring_panel = ScoringPanel(self, session)
        self.sizer.Add(self.scoring_panel, 0, wx.EXPAND)
        # The viewer fixed its minimum size before the panel existed; make room for both.
        width, height = self.GetMinSize()
        self.SetMinSize((width, height + self.scoring_panel.GetBestSize()[1]))
        self.Layout()
        # CHAR_HOOK reaches the frame first for keys pressed in any of its children (image, toolbar).
        self.Bind(wx.EVT_CHAR_HOOK, self.OnScoringKey)

    def load_image(self, file_name_or_data, refresh=False):
        super().load_image(file_name_or_data, refresh=refresh)
        if self.scoring_panel is not None:
            self.scoring_panel.refresh()

    def OnScoringKey(self, event):
        focus = wx.Window.FindFocus()
        # Letters typed into a text field are text; the viewer's "Jump:" and "Stack:" fields take
        # only digits, so j/k/l there still score (the expert just jumped and looks at the image).
        typing = isinstance(focus, (wx.TextEntry, wx.SpinCtrl, wx.SpinCtrlDouble)) and not isinstance(
            focus, PhilIntCtrl
        )
        if typing or event.HasAnyModifiers():
            event.Skip()
            return
        code = event.GetKeyCode()
        key = chr(code).upper() if 0 < code < 256 else ""
        if key in SCORE_KEYS:
            self.scoring_panel.score(SCORE_KEYS[key])
        elif key == UNDO_KEY:
            self.scoring_panel.undo()
        elif key == FIRST_UNSCORED_KEY:
            self.scoring_panel.go_to_first_unscored()
        else:
            event.Skip()


def create_annotation_frame(params, experiments, reflections, session):
    """Build and show the viewer as ``dials.image_viewer`` does, then go to the first unscored image.

    ``params`` is an extracted ``dials.image_viewer`` phil scope; ``experiments`` a list of
    ExperimentLists; the session's images must be the viewer's images in the same order.
    """
    frame = AnnotationFrame(
        None,
        -1,
        "X-ray image display: expert scoring",
        size=(800, 720),
        pos=(100, 100),
        params=params,
        experiments=experiments,
        reflections=reflections,
        session=session,
    )
    display = wx.GetClientDisplayRect()
    frame.SetSize((min(1100, display.width), min(880, display.height)))
    frame.Show()

    locations = []
    for imageset in frame.imagesets:
        locations.extend(image_locations(imageset))
        for index in range(len(imageset.indices())):
            frame.add_file_name_or_data(chooser_wrapper(imageset, index))
    if locations != session.images:
        frame.Destroy()
        raise ScoringError("The scoring session's images are not the viewer's images; build both from the same experiments.")

    start = session.first_unscored()
    frame.load_image(frame.images[0 if start is None else start])
    if start is None:
        frame.scoring_panel.show_message("All images are scored; browse, re-score or undo.")
    return frame


def run_annotation_viewer(params, experiments, reflections, session):
    """Open the viewer and return when its window is closed."""
    app = wx.GetApp()
    if app is None:
        try:
            app = wx.App()
        except SystemError:  # wx cannot connect to the X server
            raise ScoringError(
                f"Cannot open the display {os.environ.get('DISPLAY', '')!r}; check DISPLAY, or run under a "
                "virtual X server: xvfb-run -a dials.cnn_annotate ..."
            ) from None
    create_annotation_frame(params, experiments, reflections, session)
    app.MainLoop()
