"""Retail domain (in-domain): Nordbay, an invented online shop with orders, returns and cancellations.

The policy and the conversation scripts; the database and the tools are in retail_tools.py.
Policy rules the scripts follow and the tools enforce: authenticate first (email, or name + zip),
pending orders can be cancelled or re-addressed, delivered items can be returned within 30 days,
every change needs an explicit yes.
"""

from __future__ import annotations

from typing import Any

from data.synthetic.retail_steps import RetailSteps, describe_items
from data.synthetic.retail_tools import CATALOG, RETURN_DAYS, TOOLS, make_db, random_address
from data.synthetic.world import Dialogue, Domain, confirm_write, converse, listing, money

POLICY = (
    "You are the support agent of Nordbay, an online shop. Authenticate the user by email or by name "
    "and zip before any account action. Ask for missing details; if the user names an item but no "
    "order id, find the order among their orders. Only pending orders can be cancelled or get a new "
    "address. Delivered items can be returned within 30 days, refunded to the original payment or a "
    "gift card if asked. Before a change, state it and wait for an explicit yes. Refuse anything else."
)


class RetailChat(RetailSteps):
    """Scripts one retail conversation about the database's single customer, one method per intent."""

    def cancel(self, dlg: Dialogue, first: bool) -> None:
        order = self.pick_order(("pending",))
        order_id = order["order_id"]
        reason = self.rng.choice(("no longer needed", "ordered by mistake"))
        reason_text = {"no longer needed": self.rng.choice(("I don't need it anymore", "I no longer need it")),
                       "ordered by mistake": self.rng.choice(("I ordered it by mistake", "it was a mistake"))}[reason]
        order_id, current = self.request_order(
            first, order, "cancel an order",
            ("I'd like to cancel order {order}, {why}.", "Please cancel my order {order}; {why}.",
             "Can you cancel {order}? {Why}."),
            ("Please cancel the order with the {item}; {why}.", "I want to cancel my {item} order, {why}."),
            ("I want to cancel an order, {why}.", "Please cancel my order, {why}."),
            why=reason_text, Why=reason_text[0].upper() + reason_text[1:])
        current = current or self.look_up(order_id, "check that it is still pending")
        if current["status"] != "pending":
            dlg.say(dlg.pick(("Sorry, order {order} is {status}, so it can no longer be cancelled.",
                              "I can't cancel order {order}: it is already {status}. Only pending orders can be cancelled."),
                             order=order_id, status=current["status"]),
                    f"get_order shows order {order_id} is {current['status']}. Only pending orders can be "
                    "cancelled, so I refuse without calling cancel_order.")
            return
        total = money(current["total"])
        confirm_write(dlg, 
            dlg.pick(("Order {order} with {items} is pending. Cancelling it refunds {total} to your original payment. "
                      "Shall I go ahead?",
                      "I can cancel order {order} for the reason '{reason}'; you'd get {total} back. Do you confirm?"),
                     order=order_id, items=describe_items(current["items"]), total=total, reason=reason),
            f"Order {order_id} is pending, so it can be cancelled, with a refund of the order total {total}. "
            "The policy needs an explicit yes before I call cancel_order, so I ask for confirmation.",
            ("cancel_order", {"order_id": order_id, "reason": reason}),
            f"The user confirmed. I call cancel_order for {order_id} with the reason '{reason}' they gave.",
            lambda result: (dlg.pick(("Done: order {order} is cancelled and {refund} will be refunded.",
                                      "Order {order} is now cancelled. You'll get {refund} back."),
                                     order=order_id, refund=money(result["refund"])),
                            f"cancel_order succeeded: {order_id} is cancelled with a refund of "
                            f"{money(result['refund'])}. I tell the user."),
            dlg.pick(("Okay, I've left order {order} as it is.", "No problem, order {order} stays active."),
                     order=order_id))

    def return_(self, dlg: Dialogue, first: bool) -> None:
        order = self.pick_order(("delivered",), returnable=True)
        order_id = order["order_id"]
        count = self.rng.randint(1, len(order["items"]))
        chosen = sorted(self.rng.sample(order["items"], count), key=lambda item: item["item_id"])
        name_items = self.rng.random() < 0.7
        names = listing([item["name"] for item in chosen])
        gift_card = self.rng.random() < 0.25
        what = f"the {names}" if name_items else "something"
        request = self.order_phrase(
            order_id, ("I want to return {what} from order {order}.", "Can I send back {what} from {order}?",
                       "I'd like a return for {what} in order {order}."),
            ("I want to return {what} I bought.", "I need to send back {what} from an order."), what=what)
        if gift_card:
            request += " " + self.rng.choice(("Please refund it as a gift card.", "A gift card refund is fine."))
        if self.open_request(first, request, "return items", order_id, can_search=name_items):
            current = self.search_orders(chosen, "return items")
            order_id = current["order_id"]
        else:
            current = self.look_up(order_id, "check its status and items")
        days = current.get("days_since_delivery")
        if current["status"] != "delivered" or days > RETURN_DAYS:
            why = (f"it was delivered {days} days ago, more than {RETURN_DAYS}" if current["status"] == "delivered"
                   else f"it is {current['status']}, not delivered")
            dlg.say(dlg.pick(("Sorry, order {order} can't be returned: {why}.",
                              "I'm unable to return items from order {order} because {why}."), order=order_id, why=why),
                    f"get_order shows order {order_id}: {why}. Returns need a delivered order within "
                    f"{RETURN_DAYS} days, so I refuse and do not call return_items.")
            return
        if not name_items:
            dlg.say(dlg.pick(("Order {order} has {items}. Which items do you want to return?",
                              "Which items from order {order} should I return: {items}?"),
                             order=order_id, items=describe_items(current["items"])),
                    f"Order {order_id} was delivered {days} days ago, so returns are allowed, but the user did "
                    "not say which items. I list them and ask.")
            dlg.user(dlg.pick(("The {names}.", "Just the {names}, please.", "I'd return the {names}."), names=names))
        refund = round(sum(item["price"] for item in chosen), 2)
        method = "gift_card" if gift_card else "original"
        arguments: dict[str, Any] = {"order_id": order_id, "item_ids": [item["item_id"] for item in chosen]}
        if gift_card:
            arguments["refund_method"] = "gift_card"
        prices = " + ".join(money(item["price"]) for item in chosen)
        arithmetic = f"{prices} = {money(refund)}" if len(chosen) > 1 else money(refund)
        destination = "a gift card" if gift_card else "your original payment"
        confirm_write(dlg, 
            dlg.pick(("I can return {items} from order {order}. The refund of {refund} goes to {dest}. Confirm?",
                      "Returning {items} from {order} gives a refund of {refund} to {dest}. Shall I proceed?"),
                     items=describe_items(chosen), order=order_id, refund=money(refund), dest=destination),
            f"Order {order_id} was delivered {days} days ago, within {RETURN_DAYS}, so the return is allowed. "
            f"Refund: {arithmetic}. I need an explicit yes before calling return_items.",
            ("return_items", arguments),
            f"The user confirmed. I call return_items for {order_id} with item ids "
            f"{', '.join(arguments['item_ids'])}" + (" and a gift card refund." if gift_card else "."),
            lambda result: (dlg.pick(("Your return for order {order} is requested. {refund} will go to {dest}.",
                                      "Done. The return is requested and {refund} will be refunded to {dest}."),
                                     order=order_id, refund=money(result["refund"]), dest=destination),
                            f"return_items succeeded with a refund of {money(result['refund'])} to "
                            f"{'a gift card' if method == 'gift_card' else 'the original payment'}. I tell the user."),
            dlg.pick(("Alright, no return was made for order {order}.", "Okay, I won't start the return."),
                     order=order_id))

    def readdress(self, dlg: Dialogue, first: bool) -> None:
        order = self.pick_order(("pending",), bias=0.75)
        order_id = order["order_id"]
        address = random_address(self.rng)
        order_id, current = self.request_order(
            first, order, "change a shipping address",
            ("Please ship order {order} to {address} instead.", "Can you change the address of {order} to {address}?"),
            ("Please send the order with the {item} to {address}.", "Ship my {item} to {address} instead."),
            ("I moved; please send my order to {address}.", "I need my order delivered to {address}."),
            address=address)
        current = current or self.look_up(order_id, "check that it is pending")
        if current["status"] != "pending":
            dlg.say(dlg.pick(("Sorry, order {order} is {status}, so its address can't be changed.",
                              "I can't change the address: order {order} is already {status}."),
                             order=order_id, status=current["status"]),
                    f"get_order shows order {order_id} is {current['status']}. Only pending orders can get a "
                    "new address, so I refuse without calling change_address.")
            return
        confirm_write(dlg, 
            dlg.pick(("Order {order} is pending. I'll change its shipping address to {address}. Is that right?",
                      "I can send order {order} to {address}. Shall I update it?"), order=order_id, address=address),
            f"Order {order_id} is pending, so its address can change. I need an explicit yes before calling "
            "change_address.",
            ("change_address", {"order_id": order_id, "address": address}),
            f"The user confirmed. I call change_address for {order_id} with the new address {address}.",
            lambda result: (dlg.pick(("Updated: order {order} will ship to {address}.",
                                      "Done, order {order} now goes to {address}."),
                                     order=order_id, address=result["address"]),
                            f"change_address succeeded for {order_id}. I confirm the new address."),
            dlg.pick(("Okay, the address of order {order} stays the same.", "No change made to order {order}."),
                     order=order_id))

    def status(self, dlg: Dialogue, first: bool) -> None:
        order = self.pick_order(("pending", "shipped", "delivered", "cancelled"))
        order_id = order["order_id"]
        order_id, current = self.request_order(
            first, order, "know an order's status",
            ("What's the status of order {order}?", "Can you check on my order {order}?",
             "Has order {order} arrived yet?"),
            ("What's the status of my {item} order?", "Has my {item} arrived yet?"),
            ("Can you check the status of my order?", "I'd like an update on an order."))
        current = current or self.look_up(order_id, "read its status")
        if current["status"] == "shipped":
            # A shipped order's status answer gives its tracking, which takes a second read.
            tracking = dlg.call("track_order", {"order_id": order_id},
                                f"get_order shows {order_id} has shipped. The user wants to know where it is, so I "
                                "call track_order for the carrier and tracking number.")
            dlg.say(dlg.pick(("Order {order} has shipped with {carrier} (tracking {tracking}) and should arrive in "
                              "{eta} days.", "It's on its way: {carrier}, tracking {tracking}, about {eta} days left."),
                             order=order_id, carrier=tracking["carrier"], tracking=tracking["tracking"],
                             eta=tracking["eta_days"]),
                    f"track_order shows {tracking['carrier']}, tracking {tracking['tracking']}, ETA "
                    f"{tracking['eta_days']} days. I answer with these facts.")
            return
        facts = {"pending": "is pending and has not shipped yet", "cancelled": "was cancelled",
                 "delivered": f"was delivered {current.get('days_since_delivery')} days ago",
                 "return requested": "has a return in progress"}[current["status"]]
        dlg.say(dlg.pick(("Order {order} {facts}. It contains {items}, total {total}.",
                          "Your order {order} {facts}. Total: {total}."),
                         order=order_id, facts=facts, items=describe_items(current["items"]),
                         total=money(current["total"])),
                f"get_order returned status {current['status']} for {order_id}, which is not shipped, so there "
                "is nothing to track. I answer with the status.")

    def track(self, dlg: Dialogue, first: bool) -> None:
        order = self.pick_order(("shipped",), bias=0.75)
        order_id = order["order_id"]
        order_id, current = self.request_order(
            first, order, "track a package",
            ("Where is my package for order {order}?", "Can I get tracking for {order}?",
             "When will order {order} arrive?"),
            ("Where is my {item}? I need the tracking.", "Can I get tracking for the order with the {item}?"),
            ("Where is my package?", "Can I get the tracking number of my order?"))
        if current is not None and current["status"] != "shipped":
            dlg.say(dlg.pick(("Order {order} is not in transit: it is {status}.",
                              "There's no tracking for order {order} because it is {status}."),
                             order=order_id, status=current["status"]),
                    f"get_order shows {order_id} is {current['status']}, not shipped, so there is no tracking "
                    "and no need to call track_order. I tell the user the status.")
            return
        result = dlg.call("track_order", {"order_id": order_id},
                          f"The user is authenticated as {dlg.authenticated} and wants tracking for {order_id}, "
                          "so I call track_order.")
        if "error" in result:
            status = dlg.db["orders"][order_id]["status"]
            dlg.say(dlg.pick(("Order {order} is not in transit: it is {status}.",
                              "There's no tracking for order {order} because it is {status}."),
                             order=order_id, status=status),
                    f"track_order says {order_id} is {status}, not in transit, so there is no tracking to give. "
                    "I tell the user the status.")
            return
        dlg.say(dlg.pick(("Order {order} is with {carrier}, tracking {tracking}, arriving in about {eta} days.",
                          "It's on the way with {carrier} (tracking {tracking}); expected in {eta} days."),
                         order=order_id, carrier=result["carrier"], tracking=result["tracking"],
                         eta=result["eta_days"]),
                f"track_order shows {order_id} with {result['carrier']}, tracking {result['tracking']}, "
                f"ETA {result['eta_days']} days. I pass these facts on.")

    def list_orders(self, dlg: Dialogue, first: bool) -> None:
        request = dlg.pick(("Which orders do I have with you?", "Can you list my orders?",
                            "What orders are on my account?"))
        self.open_request(first, request, "see their orders", None)
        result = dlg.call("get_user", {"user_id": dlg.authenticated},
                          f"The user is authenticated as {dlg.authenticated} and wants their orders, so I call "
                          "get_user with that id.")
        orders = result["orders"]
        dlg.say(dlg.pick(("You have {count} orders: {orders}.", "I see {count} orders on your account: {orders}."),
                         count=len(orders), orders=listing(orders)),
                f"get_user lists {len(orders)} orders for {dlg.authenticated}: {listing(orders)}. I answer with them.")

    def latest(self, dlg: Dialogue, first: bool) -> None:
        """Two reads in a row: the order list, then the newest order (the last id in the list)."""
        request = dlg.pick(("What's the status of my latest order?", "Where is my most recent order?",
                            "Can you check my last order?"))
        self.open_request(first, request, "check their latest order", None)
        result = dlg.call("get_user", {"user_id": dlg.authenticated},
                          f"The user is authenticated as {dlg.authenticated} but gave no order id for the latest "
                          "order. get_user lists their orders, so I call it.")
        newest = result["orders"][-1]
        current = dlg.call("get_order", {"order_id": newest},
                           f"get_user lists {listing(result['orders'])}; the latest is the last one, {newest}. "
                           "I call get_order for its status.")
        dlg.say(dlg.pick(("Your latest order, {order}, is {status}. It has {items}.",
                          "Order {order} is your most recent one; its status is {status}."),
                         order=newest, status=current["status"], items=describe_items(current["items"])),
                f"get_order shows the latest order {newest} is {current['status']}. I answer with it.")

    def search(self, dlg: Dialogue, first: bool) -> None:
        product_id = self.rng.choice(sorted(CATALOG))
        name, price = CATALOG[product_id]
        keyword = name.split()[-1]
        arguments: dict[str, Any] = {"query": keyword}
        request = dlg.pick(("Do you sell any {kw}?", "I'm looking for a {kw}.", "Do you have {kw}s in stock?"),
                           kw=keyword)
        if self.rng.random() < 0.4:
            limit = int(price) + self.rng.choice((-5, 10, 20))
            arguments["max_price"] = limit
            request += " " + self.rng.choice(("Under ${limit}, please.", "My budget is ${limit}.")).format(limit=limit)
        dlg.user(request)
        result = dlg.call("search_products", arguments,
                          f"The user asks for '{keyword}'. Catalog search needs no authentication, so I call "
                          "search_products" + (f" with max_price {arguments['max_price']}." if "max_price" in arguments
                                               else "."))
        found = result["results"]
        if not found:
            dlg.say(dlg.pick(("Sorry, I found no {kw} matching that.", "We have no {kw} in that price range.")
                             , kw=keyword),
                    "search_products returned no results, so I tell the user nothing matches.")
            return
        offers = listing([f"{item['name']} ({item['product_id']}) at {money(item['price'])}, "
                          + ("in stock" if item["in_stock"] else "out of stock") for item in found])
        dlg.say(dlg.pick(("We have {offers}.", "I found {offers}."), offers=offers),
                f"search_products returned {len(found)} result(s). I list name, id, price and stock.")

    def refuse(self, dlg: Dialogue, first: bool) -> None:
        request, reason = self.rng.choice((
            ("Can you give me a discount on my next order?", "I can't offer discounts"),
            ("Another shop sells this cheaper, can you match the price?", "we don't price match"),
            ("Could you waive the shipping fee for me?", "I can't waive fees"),
            ("Can you change the email on my account?", "I can't change account emails here")))
        dlg.user(request)
        dlg.say(dlg.pick(("Sorry, {reason}; the policy doesn't allow it.", "I'm afraid {reason}. Anything else?"),
                         reason=reason),
                f"The user asks for something the policy does not allow ({reason}). No tool can do it, so I "
                "refuse politely.")


def script(dlg: Dialogue) -> None:
    chat = RetailChat(dlg)
    openers = [(chat.cancel, 3), (chat.return_, 3), (chat.readdress, 1.5), (chat.status, 2), (chat.track, 1.5),
               (chat.list_orders, 1), (chat.latest, 1.5), (chat.search, 1)]
    followups = openers + [(chat.refuse, 0.7)]
    converse(dlg, openers, followups)


RETAIL = Domain("retail", POLICY, TOOLS, make_db, script)
