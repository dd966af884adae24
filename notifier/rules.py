"""What each business event causes, and which category each template belongs to.

Adding a rule is one entry in RULES plus its templates under templates/email/ (and, for a new
template, one entry in TEMPLATE_CATEGORIES). A rule's `data` is the event's data with the user's
name added; `delay` is seconds after the event (a Settings attribute name may stand in for a number,
so operators can tune it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from notifier.models import Category, Priority

TEMPLATE_CATEGORIES: dict[str, Category] = {
    "verification": Category.TRANSACTIONAL,
    "password_reset": Category.TRANSACTIONAL,
    "order_confirmation": Category.TRANSACTIONAL,
    "welcome": Category.PRODUCT,
    "digest": Category.UPDATES,
}
# A template nobody categorised follows the user's preferences: safer than mailing regardless.
UNCATEGORISED = Category.PRODUCT


@dataclass(frozen=True)
class Notify:
    template: str
    priority: Priority = Priority.DEFAULT
    delay: int | str = 0


RULES: dict[str, tuple[Notify, ...]] = {
    "user.signup": (
        Notify("verification", Priority.HIGH),
        Notify("welcome", Priority.LOW, delay="welcome_delay_seconds"),
    ),
    "password.reset_requested": (Notify("password_reset", Priority.HIGH),),
    "order.placed": (Notify("order_confirmation", Priority.DEFAULT),),
}
# Every template some event's rule sends: where an event's idempotency key may have stored a notification.
TEMPLATES: tuple[str, ...] = tuple(sorted({notify.template for notifies in RULES.values() for notify in notifies}))


def own_categories(settings) -> Mapping[str, Category]:
    """The categories TEMPLATE_CATEGORIES gives, over the shipped ones: what category_of takes as own."""
    return MappingProxyType({**TEMPLATE_CATEGORIES, **{name: Category(c) for name, c in settings.template_categories}})


def category_of(template: str | None, requested: str | None = None,
                own: Mapping[str, Category] = TEMPLATE_CATEGORIES) -> Category:
    """A template's category (own: own_categories(settings)); a literal send says its own
    (transactional unless it says otherwise)."""
    if template:
        return own.get(template, UNCATEGORISED)
    return Category(requested) if requested else Category.TRANSACTIONAL


def delay_of(rule: Notify, settings) -> int:
    return getattr(settings, rule.delay) if isinstance(rule.delay, str) else rule.delay
