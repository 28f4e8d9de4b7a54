"""Step 1: pick an image — from the engine's list, or an archive file by its path."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import TYPE_CHECKING, ClassVar, Optional

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, Label, Static

from app.format import human_bytes, image_label, plural, short_created, short_id
from app.tui.backend import Backend
from app.tui.messages import DetailsLoaded, EngineDown, FileOpened, ImagesLoaded
from app.tui.screens.base import StepScreen
from app.tui.widgets.chrome import Field
from app.tui.wizard import Wizard
from injector.errors import DbootError

if TYPE_CHECKING:
    from injector.image.sources import ImageDetails, ImageSummary

ENGINE_DOWN_HELP = """\
Start it, then press [b]r[/b] to look again:

    [b]systemctl start docker[/b]                 on a host with systemd
    [b]dockerd >/var/log/dockerd.log 2>&1 &[/b]    anywhere else (as root)

Or press [b]o[/b] to open a file instead, by its path: a [b]docker save[/b] archive
or a filesystem tarball, compressed or not."""


# How an opened file's kind shows in the Tag column.
FILE_KINDS = {"docker-archive": "docker save", "rootfs": "tarball"}


def listed_order(images: list[ImageSummary]) -> list[ImageSummary]:
    """Newest first, as `docker images` lists them (the image just built or pulled is on
    top), those created at the same time by name; untagged `<none>` ones last."""
    by_name = sorted(images, key=lambda image: (image.repository, image.tag))
    # The engine's dates are ISO 8601 in UTC, one format: as text they sort in time order.
    # Sorting is stable, reverse included: images created together stay in name order.
    newest_first = sorted(by_name, key=lambda image: image.created, reverse=True)
    return sorted(newest_first, key=lambda image: "<none>" in (image.repository, image.tag))


# Optional[str]: a base class is evaluated at run time, and Python 3.9 has no `str | None`.
class OpenFileScreen(ModalScreen[Optional[str]]):
    """Ask for an image file by its plain path: the engine tells its kind from its content.

    The dialog stays open until the file is known to open (its details read), and says in
    one line why not otherwise. ``docker-archive:PATH`` and ``rootfs:PATH`` work too.
    """

    AUTO_FOCUS = "#open-file-ref"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend

    def compose(self) -> ComposeResult:
        with Vertical(id="open-file"):
            yield Label("[b]Open an image file[/b]")
            yield Label(
                "The path of a `docker save` archive or of a filesystem tarball, plain\n"
                "or compressed (gzip, zstd, xz): its kind is read from its content."
            )
            yield Field(placeholder="/path/to/image.tar", id="open-file-ref")
            yield Static("Enter opens it, Escape cancels.", id="open-file-status", classes="hint")

    def action_cancel(self) -> None:
        self.dismiss(None)

    def status(self, text: str, style: str = "dim") -> None:
        self.query_one("#open-file-status", Static).update(Text(text, style=style))

    @on(Input.Submitted)
    def submitted(self, event: Input.Submitted) -> None:
        event.stop()
        given = event.value.strip()
        if not given:
            self.status("✗ Type the path of an image file first, or Escape to cancel.", "bold red")
            return
        self.status(f"Reading {given}…")
        self.identify(given)

    @work(thread=True, exclusive=True, group="open-file")
    def identify(self, given: str) -> None:
        try:
            ref = self.backend.file_ref(given)
            self.backend.details(ref)  # Opens it: a broken archive is told here, not later.
        except DbootError as error:
            self.post_message(FileOpened(None, str(error)))
            return
        self.post_message(FileOpened(ref, None))

    def on_file_opened(self, message: FileOpened) -> None:
        if message.ref is None:
            self.status(f"✗ {message.error}", "bold red")
            return
        self.dismiss(message.ref)


class ImagesScreen(StepScreen):
    STEP = 0
    AUTO_FOCUS = "#images"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "filter", "Filter"),
        Binding("o", "open_file", "Open file"),
        Binding("r", "reload", "Reload"),
    ]

    def body(self) -> ComposeResult:
        yield Field(placeholder="filter: repository, tag or id", id="filter", classes="hidden")
        table: DataTable[str | Text] = DataTable(id="images", cursor_type="row", zebra_stripes=True)
        yield table
        yield Static("", id="engine-down", classes="hidden")
        with VerticalScroll(id="details-pane"):
            yield Static("", id="details")

    def __init__(self, wizard: Wizard) -> None:
        super().__init__(wizard)
        self.images: list[ImageSummary] = []
        # Files opened with `o` are listed above the engine's images for this session.
        self.opened: dict[str, ImageDetails] = {}
        self.pending_open: set[str] = set()
        self.details: dict[str, ImageDetails] = {}
        self.selected: str | None = wizard.choices.image

    def on_mount(self) -> None:
        table = self.query_one("#images", DataTable)
        # The header says the order, over the dates it follows.
        table.add_columns("Repository", "Tag", "Image ID", "Size", "Newest first")
        self.query_one("#details-pane").border_title = "Details"
        self.block("looking for images…")
        self.load_images()

    # --- workers: the engine is only ever asked from a thread ------------------------------
    @work(thread=True, exclusive=True, group="images")
    def load_images(self) -> None:
        try:
            images = self.wizard.backend.list_images()
        except DbootError as error:
            self.post_message(EngineDown(str(error)))
            return
        self.post_message(ImagesLoaded(listed_order(images)))

    @work(thread=True, exclusive=True, group="details")
    def load_details(self, ref: str) -> None:
        try:
            details = self.wizard.backend.details(ref)
        except DbootError as error:
            self.post_message(DetailsLoaded(ref, None, str(error)))
            return
        self.post_message(DetailsLoaded(ref, details, None))

    # --- engine answers --------------------------------------------------------------------
    def on_images_loaded(self, message: ImagesLoaded) -> None:
        self.images = message.images
        self._show_table(True)
        self.fill_table()

    def on_engine_down(self, message: EngineDown) -> None:
        self.images = []
        if self.opened:
            self.fill_table()
            return
        self._show_table(False)
        panel = self.query_one("#engine-down", Static)
        panel.update(
            f"[b red]The Docker engine does not answer.[/]\n{message.error}\n\n{ENGINE_DOWN_HELP}"
        )
        self.block("no image: start the engine (r) or open a file (o)")

    def on_details_loaded(self, message: DetailsLoaded) -> None:
        if message.details is not None:
            self.details[message.ref] = message.details
        if message.ref in self.pending_open:
            self.pending_open.discard(message.ref)
            if message.details is None:
                self.notify(message.error or "cannot open it", title="Open file", severity="error")
                return
            self.opened[message.ref] = message.details
            self.selected = message.ref
            self._show_table(True)
            self.fill_table()
        if message.ref == self.selected:
            self.show_details(message.ref, message.details, message.error)

    # --- the table -------------------------------------------------------------------------
    def _show_table(self, visible: bool) -> None:
        self.query_one("#images").set_class(not visible, "hidden")
        self.query_one("#details-pane").set_class(not visible, "hidden")
        self.query_one("#engine-down").set_class(visible, "hidden")

    def fill_table(self) -> None:
        table = self.query_one("#images", DataTable)
        table.clear()
        needle = self.query_one("#filter", Input).value.strip().lower()
        for ref, details in self.opened.items():
            if needle in ref.lower():
                # The file's name and its kind fit at 80 columns; the details show its path.
                kind, _, path = ref.partition(":")
                name = PurePosixPath(path).name
                size = human_bytes(details.size)
                kind_label = f"({FILE_KINDS.get(kind, kind)})"
                table.add_row(name, kind_label, short_id(details.id), size, "", key=ref)
        for image in self.images:
            ref = image_label(image.repository, image.tag, image.id)
            if needle and not any(needle in f.lower() for f in (ref, image.id)):
                continue
            table.add_row(
                Text(image.repository, style="dim" if image.repository == "<none>" else ""),
                image.tag,
                short_id(image.id),
                Text(human_bytes(image.size), justify="right"),
                short_created(image.created),
                key=ref,
            )
        if table.row_count == 0:
            self.block("no image matches" if needle else "the engine has no image: open a file (o)")
            self.query_one("#details", Static).update("")
            return
        # Come back to the image chosen before (Back from a later step, or a refresh).
        if self.selected is not None and self.selected in table.rows:
            table.move_cursor(row=table.get_row_index(self.selected))
        self.highlight(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    @on(DataTable.RowHighlighted, "#images")
    def row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.highlight(event.row_key.value)

    def highlight(self, ref: str | None) -> None:
        if ref is None:
            return
        self.selected = ref
        self.unblock(f"Enter: continue with {ref}")
        if ref in self.details:
            self.show_details(ref, self.details[ref], None)
        else:
            self.query_one("#details", Static).update(Text(f"Reading {ref}…", style="dim"))
            self.load_details(ref)

    def show_details(self, ref: str, details: ImageDetails | None, error: str | None) -> None:
        pane = self.query_one("#details", Static)
        if details is None:
            pane.update(Text(error or f"no details for {ref}", style="red"))
            return
        text = Text()
        text.append(ref, style="bold")
        text.append(f"  {short_id(details.id)}  {details.architecture}  ")
        text.append(human_bytes(details.size) + "\n")
        text.append("tags        ", style="dim")
        text.append((", ".join(details.tags) or "(untagged)") + "\n")
        text.append("entrypoint  ", style="dim")
        text.append(_argv_text(details.entrypoint) + "\n")
        text.append("cmd         ", style="dim")
        text.append(_argv_text(details.cmd) + "\n")
        layers = plural(len(details.history), "layer")
        text.append(f"history     {layers}, newest first\n", style="dim")
        for step in details.history:
            text.append(f"  {step}\n")
        text.rstrip()
        pane.update(text)

    @on(DataTable.RowSelected, "#images")
    def row_selected(self, event: DataTable.RowSelected) -> None:
        self.highlight(event.row_key.value)
        self.action_next()

    def commit(self) -> bool:
        if self.selected is None:
            return False
        choices = self.wizard.choices
        if choices.image != self.selected:
            # Another image: the later steps must not reuse the old init command or report.
            choices.init_argv = []
            choices.report = None
        choices.image = self.selected
        choices.details = self.details.get(self.selected)
        return True

    # --- filter, open, reload ------------------------------------------------------------
    def action_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.remove_class("hidden")
        field.focus()

    @on(Input.Changed, "#filter")
    def filter_changed(self) -> None:
        self.fill_table()

    @on(Input.Submitted, "#filter")
    def filter_done(self) -> None:
        # What the nav line promises: "Enter: continue with" the highlighted image. Tab
        # reaches the list, to pick another match.
        self.action_next()

    def action_back(self) -> None:
        # Escape on the first step closes the filter; there is no step before this one.
        field = self.query_one("#filter", Input)
        if not field.has_class("hidden"):
            field.value = ""
            field.add_class("hidden")
            self.query_one("#images").focus()

    def action_reload(self) -> None:
        self.block("looking for images…")
        self.load_images()

    def action_open_file(self) -> None:
        self.app.push_screen(OpenFileScreen(self.wizard.backend), self.open_ref)

    def open_ref(self, ref: str | None) -> None:
        if ref is None:
            return
        # The dialog read it already: its details come from the backend's open source.
        self.pending_open.add(ref)
        self.load_details(ref)


def _argv_text(argv: list[str] | None) -> str:
    if not argv:
        return "—"
    return " ".join(argv)
